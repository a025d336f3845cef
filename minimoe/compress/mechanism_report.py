"""The mechanism experiment's report: every number of ``mechanism_stats`` as markdown, hypotheses held or missed.

A smoke run (the CPU presets: a tiny reader, a few steps) prints the same tables under a banner saying that its
numbers carry no meaning, and judges no hypothesis.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

GAP_TARGET = 0.40  # pre-registered: the global arm at the lowest ratio closes at least 40% of the reader's test F1 gap


def _pct(value, signed: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.1f}%" if signed else f"{value:.1f}%"


def _steps(value) -> str:
    return "never" if value is None else str(value)


def _ratio(value) -> str:
    return "inf" if value is None or math.isinf(value) else f"{value:.2f}"


def _verdict(held: bool | None, smoke: bool, missing: int = 0) -> str:
    if smoke:
        return "not judged (smoke run)"
    if held is None:
        return f"not judged (cut short: {missing} PIC/global pair(s) of its ratios did not finish)"
    return "held" if held else "missed"


def _gap_verdict(closed: float | None, seeds: int, wanted: int, smoke: bool) -> str:
    if seeds < wanted and not smoke:
        return f"not judged (cut short: {seeds} of {wanted} seeds finished)"
    return _verdict(closed is not None and closed >= GAP_TARGET, smoke)


def markdown(summary: dict) -> str:
    c, reader, protocol = summary["config"], summary["reader"], summary["protocol"]
    smoke = bool(c.get("smoke"))
    lines = []
    if smoke:
        lines += ["**Smoke run: these numbers mean nothing.** A tiny reader trained for a few steps and compressors "
                  "trained for a few more check that every stage runs and every table fills; no hypothesis is "
                  "judged and no conclusion is drawn.", ""]
    if summary.get("missing"):
        lines += [f"**Cut short: {summary['missing']} grid setting(s) did not finish;** every table below is over the "
                  "settings that did.", ""]
    b, dev = reader["bounds"], reader["dev_teacher_forced"]
    gate = protocol["gate"]
    lines += [f"Device: {summary['device']}. Reader: {reader['parameters']:,} parameters, fine-tuned "
              f"{reader['steps']} steps in {reader['seconds']} s on full-context rows of the same generator.",
              f"Compressors: {c['steps']} steps of {c['batch_size']} fresh contexts ({c['context_tokens']} tokens, "
              f"{c['context_tokens'] // c['block_tokens']} one-person paragraphs, distinct names), each step QA + "
              f"{c['ae_rows_per_context']} addressed repeat(s) per context; LoRA rank {c['lora_rank']}; the decoder "
              f"reads the {protocol['read_path']} (500xCompressor).", "",
              "| reader input | test EM | test F1 | dev answer EM (teacher-forced) | dev repeat loss | "
              "dev value accuracy |", "|---|---:|---:|---:|---:|---:|"]
    for mode, label in (("full", "full context (upper bound)"), ("none", "no context (lower bound)")):
        lines.append(f"| {label} | {b[f'test_{mode}']['em']:.1f} | {b[f'test_{mode}']['f1']:.1f} | "
                     f"{dev[mode]['em']:.1f} | {dev[mode]['repeat_loss']:.3f} | {dev[mode]['value_accuracy']:.1f} |")
    lines += ["", f"Reader gate (test EM >= {gate['full_em_min']:g} with the context, <= {gate['none_em_max']:g} "
                  f"without): {_verdict(gate['held'], smoke)} ({gate['test_full_em']:.1f} / {gate['test_none_em']:.1f}).",
              "", "Pilot (seed outside the grid, best dev answer EM, teacher-forced), on both read paths:", "",
              "| learning rate | global, memory alone | PIC, memory alone | global, decoder LoRA | PIC, decoder LoRA |",
              "|---:|---:|---:|---:|---:|"]
    pilot = protocol["pilot"]
    lora = pilot.get("reader_lora_best_dev_em", {})
    for lr, scores in pilot["best_dev_em"].items():
        with_lora = lora.get(lr, {})
        lines.append(f"| {lr} | {scores['global']:.1f} | {scores['pic']:.1f} | "
                     + " | ".join(f"{with_lora[m]:.1f}" if m in with_lora else "n/a" for m in ("global", "pic")) + " |")
    empty_band = pilot["near_floor_below"] <= dev["none"]["em"]  # the reader's dev bounds are equal (or inverted)
    if pilot["both_near_floor"]:
        verdict = ("Both arms stayed there on the memory-alone path at every rate, so the decoder got a LoRA too, for "
                   "both arms alike")
    elif empty_band:
        verdict = ("The reader's dev bounds leave no band (no score can be below the no-context one), so the decoder "
                   "stays frozen")
    else:
        verdict = "An arm on the memory-alone path came off it at some rate, so the decoder stays frozen"
    lines.append(f"\nNear the floor means below {pilot['near_floor_below']:.1f} dev EM. {verdict}; chosen learning "
                 f"rate {pilot['lr']:g} (by the global arm on that path).")
    lines += ["", "| method | ratio | memory | seeds | test EM (mean ± sd) | test F1 (mean ± sd) | gap closed | "
                  "F1 by paragraph | wrong answers from another paragraph |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in summary["table"]:
        paragraphs = " / ".join(f"{x:.0f}" for x in row["f1_by_paragraph"])
        other = "n/a" if row["wrong_from_other_paragraph"] is None else f"{100 * row['wrong_from_other_paragraph']:.0f}%"
        closed = "n/a" if row["gap_closed"] is None else f"{100 * row['gap_closed']:.0f}%"
        lines.append(f"| {row['method']} | {row['ratio']}x | {row['num_memory']} | {row['seeds']} | {row['em']:.1f} ± "
                     f"{row['em_sd']:.1f} | {row['f1']:.1f} ± {row['f1_sd']:.1f} | {closed} | {paragraphs} | {other} |")
    lines += ["", "| ratio | PIC vs global, F1 (relative) | 95% CI | EM (relative) | 95% CI | per-seed F1 difference "
                  "(points) |", "|---:|---:|---|---:|---|---|"]
    for g in summary["gains"]:
        ci = lambda key: "n/a" if g[key][0] is None else f"[{g[key][0]:+.1f}, {g[key][1]:+.1f}]"  # noqa: E731
        seeds = ", ".join(f"{row['difference']:+.1f}" for row in g["f1_per_seed"])
        lines.append(f"| {g['ratio']}x | {_pct(g['f1_gain'])} | {ci('f1_ci')} | {_pct(g['em_gain'])} | {ci('em_ci')} | "
                     f"{seeds} |")
    lines += _hypotheses(summary, smoke)
    lines += ["", "Steps to close 25 / 50 / 75% of the reader's dev answer-EM gap (smoothed; per seed):", ""]
    for name, fractions in summary["gap_steps"].items():
        lines.append(f"- {name}: " + "; ".join(f"{float(f):.0%}: {', '.join(_steps(s) for s in steps)}"
                                               for f, steps in fractions.items()))
    lowest = min(c["ratios"])
    base_row = next((r for r in summary["table"] if r["method"] == "global" and r["ratio"] == lowest), None)
    if base_row is not None:
        closed = base_row["gap_closed"]
        lines += ["", f"Global at {lowest}x closes " + ("n/a (the reader's bounds are equal)" if closed is None else
                                                         f"{100 * closed:.0f}%") +
                  f" of the gap between the reader's test F1 bounds (pre-registered: at least {GAP_TARGET:.0%}): "
                  f"{_gap_verdict(closed, base_row['seeds'], len(c['seeds']), smoke)}."]
    return "\n".join(lines) + "\n"


def _hypotheses(summary: dict, smoke: bool) -> list[str]:
    h = summary["hypotheses"]
    if h is None:
        return ["", "Hypotheses: not judged (no ratio has both arms)."]
    h1, h2, h3 = h["H1"], h["H2"], h["H3"]
    lines = ["", f"- **H1** (held-out reconstruction: PIC reaches global's final value accuracy in <= 0.6x the steps at "
                 f"{', '.join(f'{r}x' for r in h1['ratios'])}, in >= 2 of 3 seeds): "
                 f"{_verdict(h1['held'], smoke, h1['missing'])}."]
    for ratio, rows in h1["per_seed"].items():
        if rows:
            lines.append(f"  - {ratio}x: " + "; ".join(
                f"seed {r['seed']}: target {r['target']:.1f}%, global {_steps(r['global_steps'])} steps, PIC "
                f"{_steps(r['pic_steps'])} ({_ratio(r['ratio'])}x)" for r in rows))
    trend = " -> ".join(_pct(x) for x in h2["f1_gains"])
    ci = "n/a" if h2["top_ci"][0] is None else f"[{h2['top_ci'][0]:+.1f}, {h2['top_ci'][1]:+.1f}]"
    lines.append(f"- **H2** (the relative F1 gain grows with the ratio and the CI at the highest lies above 0): "
                 f"{_verdict(h2['held'], smoke, h2['missing'])}. Gains {trend}; "
                 f"grows: {'yes' if h2['grows'] else 'no'}; CI {ci}.")
    lines.append(f"- **H3** (at {h3['ratio']}x PIC reaches global's smoothed peak dev EM in <= 0.7x the steps, median "
                 f"of seeds): {_verdict(h3['held'], smoke, h3['missing'])}. Median {_ratio(h3['median'])}x; " + "; ".join(
                     f"seed {r['seed']}: peak {r['target']:.1f}, global {_steps(r['global_steps'])}, PIC "
                     f"{_steps(r['pic_steps'])}" for r in h3["per_seed"]) + ".")
    return lines


def write_mechanism_report(summary: dict, out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary) + "\n")
    (out / "results.md").write_text(markdown(summary))
