"""The PIC experiment's tables: scores with their bounds, the ratio trend, time to target, attention locality.

Relative gains follow the paper's convention, (PIC - global) / global in percent, computed on the seed means.
Time to target at the middle ratio: for every seed, the target is the best dev F1 the global baseline of that
seed reached; each method's cost is the steps (and training seconds) of its first evaluation at or above it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minimoe.compress.analysis import mean_sd, time_to_target

METHOD_ORDER = ("global", "pic", "pic-interleave", "pic-mem2mem", "pic-interleave-mem2mem")


def _scores(runs: list[dict]) -> dict:
    em, f1 = mean_sd(r["test"]["em"] for r in runs), mean_sd(r["test"]["f1"] for r in runs)
    return {"em": em[0], "em_sd": em[1], "f1": f1[0], "f1_sd": f1[1], "seeds": len(runs),
            "num_memory": runs[0]["num_memory"], "train_seconds": mean_sd(r["train_seconds"] for r in runs)[0]}


def _mean_curve(runs: list[dict]) -> list[dict]:
    steps = [p["step"] for p in runs[0]["curve"]]
    return [{"step": s, "seconds": float(np.mean([r["curve"][i]["seconds"] for r in runs])),
             "f1": float(np.mean([r["curve"][i]["f1"] for r in runs])),
             "f1_sd": mean_sd(r["curve"][i]["f1"] for r in runs)[1]} for i, s in enumerate(steps)]


def paired_time_ratio(reach: dict) -> dict:
    """PIC's steps and seconds to the target over the global baseline's, on the seeds where **both** reached it
    (sum over those seeds of PIC's / sum of the baseline's); {} when no seed is shared. Averaging each method
    over its own reaching seeds instead would favour the method that misses on its slow seeds."""
    if "global" not in reach or "pic" not in reach:
        return {}
    global_by_seed = {row["seed"]: row for row in reach["global"]["per_seed"] if row["step"] is not None}
    pairs = [(global_by_seed[row["seed"]], row) for row in reach["pic"]["per_seed"]
             if row["step"] is not None and row["seed"] in global_by_seed]
    if not pairs:
        return {}
    return {"paired_seeds": len(pairs),
            "pic_over_global_steps": sum(p["step"] for _, p in pairs) / sum(g["step"] for g, _ in pairs),
            "pic_over_global_seconds": sum(p["seconds"] for _, p in pairs) / sum(g["seconds"] for g, _ in pairs)}


def summarise(cfg, prepare_info: dict, results: list[dict]) -> dict:
    if not results:
        raise ValueError("no finished runs to summarise")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["ratio"]), []).append(r)
    table = [{"method": m, "ratio": ratio, **_scores(runs)} for (m, ratio), runs in
             sorted(groups.items(), key=lambda kv: (kv[0][1], METHOD_ORDER.index(kv[0][0])))]
    gains = []
    for ratio in sorted({r for _, r in groups}):
        if ("global", ratio) in groups and ("pic", ratio) in groups:
            g, p = _scores(groups[("global", ratio)]), _scores(groups[("pic", ratio)])
            relative = {key: None if g[key] == 0 else 100 * (p[key] - g[key]) / g[key] for key in ("f1", "em")}
            gains.append({"ratio": ratio, "f1_gain_percent": relative["f1"], "em_gain_percent": relative["em"]})
    ratios = sorted(cfg.ratios)
    middle = ratios[len(ratios) // 2]
    reach = {}
    globals_by_seed = {r["seed"]: r for r in groups.get(("global", middle), [])}
    for method in ("global", "pic"):
        rows = []
        for r in groups.get((method, middle), []):
            if r["seed"] not in globals_by_seed:
                continue
            target = max(p["f1"] for p in globals_by_seed[r["seed"]]["curve"])
            hit = time_to_target(r["curve"], target)
            rows.append({"seed": r["seed"], "target_f1": target, **(hit or {"step": None, "seconds": None})})
        reached = [row for row in rows if row["step"] is not None]
        reach[method] = {"per_seed": rows, "reached": len(reached), "of": len(rows),
                         "steps": mean_sd(row["step"] for row in reached)[0] if reached else None,
                         "seconds": mean_sd(row["seconds"] for row in reached)[0] if reached else None}
    reach.update(paired_time_ratio(reach))
    attention = next((r["attention"] for r in results if "attention" in r and r["ratio"] == middle), None)
    return {"bounds": prepare_info["bounds"], "pretrain": prepare_info["pretrain"], "device": prepare_info["device"],
            "table": table, "gains": gains, "time_to_target": {"ratio": middle, **reach},
            "curves": {f"{m}_{ratio}x": _mean_curve(runs) for (m, ratio), runs in groups.items()},
            "attention": attention, "config": {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in vars(cfg).items()},
            "runs": [_run_row(r) for r in sorted(results, key=lambda r: r["name"])]}


def _run_row(r: dict) -> dict:
    """One compressor's test scores, training seconds and last recorded training losses (every 10th step)."""
    return {"name": r["name"], "test_f1": r["test"]["f1"], "test_em": r["test"]["em"],
            "train_seconds": r["train_seconds"], "ae_loss_last": r["ae_loss"][-1] if r.get("ae_loss") else None,
            "loss_last": r["loss"][-1] if r.get("loss") else None}


HANDOFF_WORDS = {"embeddings": "input embeddings (ICAE)", "kv": "keys/values in every layer (500xCompressor)"}


def markdown(summary: dict) -> str:
    b, c = summary["bounds"], summary["config"]
    how = ("SmolLM2-135M fine-tuned" if summary["config"].get("base") == "smollm2" else "a Llama pretrained here")
    smoke = bool(c.get("smoke"))
    lines = ["**Smoke run: these numbers mean nothing.** A reader and compressors trained for a few steps check that "
             "every stage runs and every table fills; no conclusion is drawn from them.", ""] if smoke else []
    lines += [f"Device: {summary['device']}. Reader: {how}, {summary['pretrain']['parameters']:,} parameters, "
             f"{summary['pretrain']['steps']} training steps in {summary['pretrain']['seconds']} s.",
             f"Compressors: {c.get('ae_steps', 0)} autoencoding + {c['steps']} QA steps of {c['batch_size']} contexts, "
             f"learning rate {c['lr']}, LoRA rank {c['lora_rank']}; the decoder reads the memory as "
             f"{HANDOFF_WORDS[c.get('handoff', 'embeddings')]}.", "",
             "| reader input | dev EM | dev F1 | test EM | test F1 |", "|---|---:|---:|---:|---:|"]
    for mode, label in (("full", "full context (upper bound)"), ("none", "no context (lower bound)")):
        lines.append(f"| {label} | {b[f'dev_{mode}']['em']:.1f} | {b[f'dev_{mode}']['f1']:.1f} | "
                     f"{b[f'test_{mode}']['em']:.1f} | {b[f'test_{mode}']['f1']:.1f} |")
    lines += ["", "| method | ratio | memory | seeds | test EM (mean ± sd) | test F1 (mean ± sd) | train s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in summary["table"]:
        lines.append(f"| {row['method']} | {row['ratio']}x | {row['num_memory']} | {row['seeds']} | "
                     f"{row['em']:.1f} ± {row['em_sd']:.1f} | {row['f1']:.1f} ± {row['f1_sd']:.1f} | "
                     f"{row['train_seconds']:.0f} |")
    lines += ["", "| ratio | PIC vs global, F1 (relative) | EM (relative) |", "|---:|---:|---:|"]
    percent = lambda value: "n/a (global scored 0)" if value is None else f"{value:+.1f}%"  # noqa: E731
    lines += [f"| {g['ratio']}x | {percent(g['f1_gain_percent'])} | {percent(g['em_gain_percent'])} |"
              for g in summary["gains"]]
    t = summary["time_to_target"]
    lines += ["", f"Time to reach the global baseline's best dev F1 at {t['ratio']}x (per seed, mean over seeds "
                  "that reached it):", "", "| method | reached | steps | train seconds |", "|---|---:|---:|---:|"]
    for method in ("global", "pic"):
        if method in t:
            m = t[method]
            steps = "-" if m["steps"] is None else f"{m['steps']:.0f}"
            seconds = "-" if m["seconds"] is None else f"{m['seconds']:.1f}"
            lines.append(f"| {method} | {m['reached']}/{m['of']} | {steps} | {seconds} |")
    if "pic_over_global_seconds" in t and not smoke:
        lines.append(f"\nOn the {t['paired_seeds']} seed(s) where both reached it, PIC needs "
                     f"{100 * t['pic_over_global_steps']:.0f}% of the baseline's steps and "
                     f"{100 * t['pic_over_global_seconds']:.0f}% of its training seconds.")
    if summary["attention"]:
        a = summary["attention"]["mean_over_layers"]
        lines.append(f"\nGlobal baseline's memory-to-text attention (mean over layers): a memory token puts "
                     f"{100 * a['window_mass']:.1f}% of its attention in its best window of one PIC chunk "
                     f"(uniform: {100 * a['uniform_window_mass']:.1f}%); order correlation {a['order']:+.2f}.")
    return "\n".join(lines) + "\n"


def write_report(summary: dict, out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "results.md").write_text(markdown(summary))
