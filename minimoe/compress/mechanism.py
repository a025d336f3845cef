"""The mechanism experiment: does PIC's block-wise mask make a compressor easier and faster to learn?

PIC's claim (arXiv 2602.13980) is about *learning*: with each memory token restricted to one chunk, the
compressor learns faster, and the advantage grows with the compression ratio. This experiment is designed to
show or refute that, with its protocol fixed before any run (``minimoe pic-experiment --preset
gpu-smollm2-mech``):

    reader gate   SmolLM2-135M fine-tuned on full-context rows of the same generator must answer >= 95% of the
                  test questions (EM) with the context and <= 10% without; the run goes on either way and the
                  report says which.
    pilot         one seed outside the grid, global and PIC at the highest ratio, every learning rate of
                  ``pilot_lrs``, ``pilot_steps`` steps, on both read paths at once (memory alone; memory and a
                  LoRA on the decoder). If both arms stay near the floor (below 10% of the reader's dev gap) on
                  the memory-alone path, the read path changes for both alike to the decoder LoRA; the learning
                  rate is picked by the *global* arm's best dev answer EM on the chosen path.
    grid          {global, PIC} x ratios x seeds, both arms of a seed on identical batches, plus controls at the
                  highest ratio: PIC with "continue" positions (as earlier runs placed memory) and global with
                  memory positions spread over the text (locality by positions alone, not by the mask).

Methods (``METHODS``): global = ICAE's causal mask, memory after the text; PIC = one chunk per paragraph,
chunk-local text and memory, positions restarting in every chunk. Steps are the primary time axis. Statistics
and the three hypotheses: ``mechanism_stats``; the report: ``mechanism_report``.

Settings run in worker processes that share the visible GPUs and claim settings one at a time (a claim is a
file created exclusively), so a slow setting never holds up another worker's queue; each writes one JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from minimoe.compress.masks import build_layout
from minimoe.compress.mechanism_data import held_out_set
from minimoe.compress.mechanism_training import (EVAL_CONTEXTS, greedy_answers, score_answers, teacher_forced,
                                                 train_mechanism)
from minimoe.compress.objectives import decoder_target_logits
from minimoe.compress.out_folder import CONFIG_FILE, check_same_settings, claim
from minimoe.compress.setup import load_prepared, prepare

PIC = dict(layout="append", positions="restart", text_sees="chunk", mem_sees_prev_mem=False)
METHODS = {  # method -> (mask variant, its options)
    "global": ("global", {}),
    "pic": ("pic", PIC),
    "pic-continue": ("pic", dict(PIC, positions="continue")),  # control: the positions earlier runs used
    "global-spread": ("global", {"positions": "spread"}),  # control: locality by positions, not by the mask
}
FLOOR_SHARE = 0.10  # "near the floor": best dev EM below floor + 10% of the reader's dev gap
GATE = {"full_em_min": 95.0, "none_em_max": 10.0}  # the reader gate, on test EM (percent)


def layout_for(cfg, method: str, ratio: int):
    variant, options = METHODS[method]
    return build_layout(variant, cfg.context_tokens, ratio, cfg.block_tokens if variant == "pic" else None, **options)


def setting(stage: str, method: str, ratio: int, seed: int, lr: float, steps: int, reader_lora: bool) -> dict:
    name = f"{stage}_{method}_{ratio}x_seed{seed}" + (f"_lr{lr:g}" if stage.startswith("pilot") else "")
    return dict(name=name, stage=stage, method=method, ratio=ratio, seed=seed, lr=lr, steps=steps,
                reader_lora=reader_lora)


def pilot_settings(cfg, reader_lora: bool = False) -> list[dict]:
    stage = "pilot-reader-lora" if reader_lora else "pilot"
    return [setting(stage, method, cfg.pilot_ratio, cfg.pilot_seed, lr, cfg.pilot_steps, reader_lora)
            for lr in cfg.pilot_lrs for method in ("global", "pic")]


def all_pilot_settings(cfg) -> list[dict]:
    """The pilot in one stage: both read paths (memory alone; memory with a decoder LoRA) at every rate, so the
    fallback the protocol may need is ready when the first path's verdict is in."""
    return pilot_settings(cfg) + pilot_settings(cfg, True)


def choose_read_path_and_lr(cfg, pilot: list[dict], near_floor: float) -> dict:
    """The protocol's two decisions from the pilot's results: the read path changes (the decoder gets a LoRA,
    for both arms alike) only when both arms on the memory-alone path stay below ``near_floor`` dev EM at every
    rate; then the learning rate is the one where the *global* arm's best dev EM is highest on the chosen path
    (ties: the lower rate)."""
    def best_by_lr(reader_lora: bool) -> dict:
        return {f"{lr:g}": {r["method"]: best_em(r) for r in pilot if r["lr"] == lr and r["reader_lora"] == reader_lora}
                for lr in cfg.pilot_lrs}

    memory_only = best_by_lr(False)
    reader_lora = all(max(scores.values()) < near_floor for scores in memory_only.values())
    chosen = best_by_lr(True) if reader_lora else memory_only
    lr = max(cfg.pilot_lrs, key=lambda x: (chosen[f"{x:g}"]["global"], -x))
    return {"best_dev_em": memory_only, "reader_lora_best_dev_em": best_by_lr(True), "lr": lr,
            "near_floor_below": near_floor, "both_near_floor": reader_lora}


def grid_settings(cfg, lr: float, reader_lora: bool) -> list[dict]:
    out = [setting("grid", method, ratio, seed, lr, cfg.steps, reader_lora)
           for seed in cfg.seeds for ratio in cfg.ratios for method in ("global", "pic")]
    if cfg.controls:
        out += [setting("control", method, max(cfg.ratios), seed, lr, cfg.steps, reader_lora)
                for seed in cfg.seeds for method in ("pic-continue", "global-spread")]
    return out


@torch.no_grad()
def reader_bounds(prepared, data, cfg) -> dict:
    """The reader's teacher-forced bounds on ``data``: answer EM and repeat loss / value accuracy with the full
    context (``[bos, context, prompt]``) and with none (``[bos, prompt]``), in the units of the dev curves."""
    base, device = prepared.base, torch.device(cfg.device)
    out = {}
    for mode in ("full", "none"):
        right = tokens = 0
        loss = value_right = value_count = 0.0
        for start in range(0, len(data.contexts), EVAL_CONTEXTS):
            docs = range(start, min(len(data.contexts), start + EVAL_CONTEXTS))
            for rows, is_qa in ((data.questions, True), (data.repeats, False)):
                keep = [i for i, d in enumerate(rows.doc) if d in docs]
                context = [data.contexts[rows.doc[i]].tolist() if mode == "full" else [] for i in keep]
                prefix = base.embed(torch.tensor([[prepared.bos_id] + c for c in context], device=device))
                logits, labels, row = decoder_target_logits(base, prefix, [rows.prompts[i] for i in keep],
                                                            [rows.targets[i] for i in keep], prepared.pad_id)
                hit = logits.argmax(-1) == labels
                if is_qa:
                    wrong = torch.zeros(len(keep), device=device).index_add_(0, row, (~hit).float())
                    right += int((wrong == 0).sum())
                else:
                    values = torch.tensor([f for i in keep for f in rows.values[i]], device=device)
                    loss += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
                    tokens += len(labels)
                    value_right += float((hit & values).sum())
                    value_count += float(values.sum())
        out[mode] = {"em": 100.0 * right / len(data.questions.doc), "repeat_loss": loss / tokens,
                     "value_accuracy": 100.0 * value_right / max(1.0, value_count)}
    return out


def run_setting(cfg, prepared, sets: dict, spec: dict, progress: bool = False) -> dict:
    """Train one compressor of ``spec`` (see ``setting``), score it; returns its JSON-able result."""
    layout = layout_for(cfg, spec["method"], spec["ratio"])
    started = time.perf_counter()
    common = dict(bos_id=prepared.bos_id, pad_id=prepared.pad_id)
    compressor, log = train_mechanism(prepared.base, layout, sets["dev"], cfg=cfg, tokenizer=prepared.tokenizer,
                                      seed=spec["seed"], lr=spec["lr"], steps=spec["steps"], eos_id=prepared.eos_id,
                                      reader_lora=spec["reader_lora"], compile=cfg.compile and cfg.device == "cuda",
                                      progress=progress, **common)
    result = {**spec, "num_memory": layout.num_memory, "curve": log["curve"], "qa_loss": log["qa_loss"][::5],
              "repeat_loss": log["repeat_loss"][::5], "train_seconds": log["train_seconds"]}
    if spec["stage"] in ("grid", "control"):
        test = sets["test"]
        predictions = greedy_answers(compressor, layout, test, prepared.bos_id, prepared.stop_ids, prepared.decode,
                                     cfg.bf16)
        scored = score_answers(predictions, test)
        result["test"] = {"em": 100.0 * sum(r["em"] for r in scored) / len(scored),
                          "f1": 100.0 * sum(r["f1"] for r in scored) / len(scored), "count": len(scored),
                          "teacher_forced": teacher_forced(compressor, layout, test, bf16=cfg.bf16, **common)}
        result["questions"] = {key: [r[key] for r in scored] for key in ("doc", "paragraph", "em", "f1", "from_other")}
        result["examples"] = [{"answer": test.answers[i], "prediction": predictions[i]} for i in range(8)]
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def _held_out(cfg, prepared) -> dict:
    return {split: held_out_set(split, getattr(cfg, f"{split}_documents"), cfg, prepared.tokenizer, prepared.pad_id,
                                prepared.eos_id) for split in ("dev", "test")}


def work(cfg, out: Path, stage_file: Path, progress: bool = False) -> None:
    """A worker: claim the stage's settings one at a time (an exclusive ``.claim`` file) and run them."""
    prepared = load_prepared(cfg, out)
    sets = _held_out(cfg, prepared)
    for spec in json.loads(stage_file.read_text()):
        result_path = out / "runs" / f"{spec['name']}.json"
        try:
            os.close(os.open(out / "runs" / f"{spec['name']}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue  # another worker has it (or it finished in an earlier, resumed run)
        if not result_path.is_file():
            result = run_setting(cfg, prepared, sets, spec, progress)
            result_path.write_text(json.dumps(result) + "\n")
            last = result["curve"][-1]
            test = f", test F1 {result['test']['f1']:.1f}" if "test" in result else ""
            print(f"{spec['name']}: dev answer EM {last['em']:.1f}, value accuracy {last['value_accuracy']:.1f}"
                  f"{test} ({result['train_seconds']:.0f} s training, {result['wall_seconds']:.0f} s in all)",
                  file=sys.stderr, flush=True)


def finished(out: Path, specs: list[dict]) -> list[dict]:
    """The results of the ``specs`` that have finished, in order."""
    paths = [out / "runs" / f"{s['name']}.json" for s in specs]
    return [json.loads(path.read_text()) for path in paths if path.is_file()]


def run_stage(cfg, out: Path, name: str, specs: list[dict], workers: int, progress: bool) -> list[dict]:
    """Run ``specs`` on ``workers`` processes (1: in this process); returns their results."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for spec in specs:  # a claim without its result is from a run that was cut short: free it
        claim = out / "runs" / f"{spec['name']}.claim"
        if claim.exists() and not (out / "runs" / f"{spec['name']}.json").exists():
            claim.unlink()
    print(f"stage {name}: {len(specs)} settings on {workers} worker(s)", file=sys.stderr, flush=True)
    stage_file = out / f"stage_{name}.json"
    stage_file.write_text(json.dumps(specs, indent=1) + "\n")
    if workers <= 1:
        work(cfg, out, stage_file, progress)
    else:
        gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
        processes = []
        for index in range(workers):
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
            command = [sys.executable, "-m", "minimoe.compress.experiment", "--mechanism-worker", str(stage_file),
                       "--config", str(out / CONFIG_FILE), "--out", str(out), "--no-progress"]
            processes.append(subprocess.Popen(command, env=env))
        failed = [p for p in processes if p.wait() != 0]
        if failed:
            raise ChildProcessError(f"{len(failed)} of {workers} workers failed in stage {name} (their errors are "
                                    f"printed above): {' '.join(map(str, failed[0].args))}")
    results = finished(out, specs)
    if len(results) != len(specs):
        raise RuntimeError(f"stage {name}: {len(specs) - len(results)} of {len(specs)} settings left no result")
    return results


def best_em(result: dict) -> float:
    return max(point["em"] for point in result["curve"])


def report_finished(cfg, out: Path) -> dict:
    """The report of whatever has finished in ``out`` (a run cut short: the grid's settings that left a result).
    Raises ValueError when ``out`` holds a run made with other settings (``out_folder.check_same_settings``), or
    when the pilot or every grid setting is missing."""
    check_same_settings(cfg, out)
    from minimoe.compress.mechanism_report import write_mechanism_report
    from minimoe.compress.mechanism_stats import summarise_mechanism

    protocol_path = out / "protocol.json"
    protocol = json.loads(protocol_path.read_text()) if protocol_path.is_file() else {}
    if "read_path" not in protocol:
        raise ValueError(f"{out}: the pilot has not finished (no learning rate chosen yet): nothing to report")
    lr, reader_lora = protocol["pilot"]["lr"], protocol["pilot"]["both_near_floor"]
    grid = finished(out, grid_settings(cfg, lr, reader_lora))
    if not grid:
        raise ValueError(f"{out}: no grid setting has finished: nothing to report")
    pilot = finished(out, all_pilot_settings(cfg))
    summary = summarise_mechanism(cfg, json.loads((out / "prepare.json").read_text()), protocol, pilot, grid)
    summary["missing"] = len(grid_settings(cfg, lr, reader_lora)) - len(grid)
    write_mechanism_report(summary, out)
    return summary


def run_mechanism(cfg, out: Path, workers: int = 1, progress: bool = True) -> dict:
    """The whole protocol (module docstring) into ``out``; returns the summary (see ``mechanism_stats``). Raises
    ValueError when ``out`` holds a run made with other settings (``out_folder.claim``)."""
    from minimoe.compress.mechanism_report import write_mechanism_report
    from minimoe.compress.mechanism_stats import summarise_mechanism

    claim(cfg, out)
    info = prepare(cfg, out, progress=progress)
    protocol_path = out / "protocol.json"
    protocol = json.loads(protocol_path.read_text()) if protocol_path.is_file() else {}
    if "bounds" not in protocol:
        prepared = load_prepared(cfg, out)
        dev = _held_out(cfg, prepared)["dev"]
        b = info["bounds"]
        protocol["bounds"] = {"dev": reader_bounds(prepared, dev, cfg)}
        protocol["gate"] = {**GATE, "test_full_em": b["test_full"]["em"], "test_none_em": b["test_none"]["em"],
                            "held": b["test_full"]["em"] >= GATE["full_em_min"]
                            and b["test_none"]["em"] <= GATE["none_em_max"]}
        del prepared
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
        protocol_path.write_text(json.dumps(protocol, indent=1) + "\n")
    dev_bounds = protocol["bounds"]["dev"]
    floor, ceiling = dev_bounds["none"]["em"], dev_bounds["full"]["em"]
    near_floor = floor + FLOOR_SHARE * (ceiling - floor)

    pilot = run_stage(cfg, out, "pilot", all_pilot_settings(cfg), workers, progress)
    protocol["pilot"] = choose_read_path_and_lr(cfg, pilot, near_floor)
    reader_lora, lr = protocol["pilot"]["both_near_floor"], protocol["pilot"]["lr"]
    protocol["read_path"] = ("memory's keys/values in every layer, with a LoRA of its own" if reader_lora
                             else "memory's keys/values in every layer")
    protocol_path.write_text(json.dumps(protocol, indent=1) + "\n")

    grid = run_stage(cfg, out, "grid", grid_settings(cfg, lr, reader_lora), workers, progress)
    summary = summarise_mechanism(cfg, info, protocol, pilot, grid)
    write_mechanism_report(summary, out)
    return summary
