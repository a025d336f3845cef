"""Statistics of the mechanism experiment and its three hypotheses, fixed before any run.

    relative gain      (PIC - global) / global of the test F1 (and EM) pooled over seeds, the paper's convention
    95% CI             paired bootstrap over test documents: resample documents (each scored by its mean over the
                       seeds), recompute the relative gain, take the 2.5th and 97.5th percentiles (2,000 draws)
    smoothed curve     the trailing mean of the last three dev evaluations (one evaluation is noisy)
    steps to target    the first evaluation step at which a (smoothed) curve reaches the target

    H1  held-out addressed reconstruction: PIC reaches the global arm's final value accuracy in <= 0.6x the
        steps the global arm took to reach it, at every ratio above the lowest, in >= 2 of 3 seeds
    H2  the relative F1 gain of PIC grows with the ratio (strictly, lowest to highest) and the CI at the highest
        ratio lies above 0 (a gain, not only a smaller loss)
    H3  at the middle ratio PIC reaches the global arm's smoothed peak dev answer EM in <= 0.7x the steps the
        global arm took to reach it (median over seeds; a seed where PIC never reaches it counts as infinite)
"""

from __future__ import annotations

import math

import numpy as np

from minimoe.compress.analysis import mean_sd

H1_RATIO, H3_RATIO, BOOTSTRAP = 0.6, 0.7, 2000
GAP_FRACTIONS = (0.25, 0.5, 0.75)


def smoothed(values: list[float], window: int = 3) -> list[float]:
    """Trailing mean: point i is the mean of points max(0, i - window + 1) .. i."""
    return [float(np.mean(values[max(0, i - window + 1):i + 1])) for i in range(len(values))]


def steps_to(curve: list[dict], key: str, target: float, smooth: bool = True) -> int | None:
    """The first step whose (smoothed) ``key`` is >= ``target``; None if the curve never gets there."""
    values = [p[key] for p in curve]
    for point, value in zip(curve, smoothed(values) if smooth else values):
        if value >= target - 1e-9:
            return point["step"]
    return None


def doc_scores(run: dict, key: str = "f1") -> np.ndarray:
    """(D,) mean of ``key`` over each test document's questions (documents in order)."""
    q = run["questions"]
    docs = np.asarray(q["doc"])
    sums = np.bincount(docs, weights=np.asarray(q[key], dtype=float))
    return sums / np.bincount(docs)


def paired_bootstrap(pic: np.ndarray, base: np.ndarray, draws: int = BOOTSTRAP, seed: int = 0) -> tuple:
    """95% CI of the relative gain (sum(pic) - sum(base)) / sum(base) in percent over resampled documents."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(pic), size=(draws, len(pic)))
    totals = base[index].sum(1)
    keep = totals > 0
    gains = 100.0 * (pic[index].sum(1)[keep] - totals[keep]) / totals[keep]
    if not len(gains):
        return None, None
    return float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))


def relative(p: float, g: float) -> float | None:
    return None if g == 0 else 100.0 * (p - g) / g


def _by(runs: list[dict], method: str, ratio: int) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if r["method"] == method and r["ratio"] == ratio}


def gains_at(runs: list[dict], ratio: int) -> dict:
    """PIC vs global at one ratio: pooled relative F1 / EM gains, their paired-bootstrap CIs, per-seed pairs."""
    g, p = _by(runs, "global", ratio), _by(runs, "pic", ratio)
    seeds = sorted(set(g) & set(p))
    out = {"ratio": ratio, "seeds": seeds}
    for key in ("f1", "em"):
        pic = np.mean([doc_scores(p[s], key) for s in seeds], axis=0)
        base = np.mean([doc_scores(g[s], key) for s in seeds], axis=0)
        out[f"{key}_gain"] = relative(float(pic.sum()), float(base.sum()))
        out[f"{key}_ci"] = paired_bootstrap(pic, base)
        out[f"{key}_per_seed"] = [{"seed": s, "difference": p[s]["test"][key] - g[s]["test"][key],
                                  "relative": relative(p[s]["test"][key], g[s]["test"][key])} for s in seeds]
    return out


def race(runs: list[dict], ratio: int, key: str, target_of) -> list[dict]:
    """Per seed: the global arm's target on ``key`` (``target_of(global curve)``), the steps each arm needs to
    reach it on its smoothed curve, and PIC's steps over global's (None when PIC never reaches it)."""
    g, p = _by(runs, "global", ratio), _by(runs, "pic", ratio)
    rows = []
    for seed in sorted(set(g) & set(p)):
        target = target_of(g[seed]["curve"])
        steps_g, steps_p = steps_to(g[seed]["curve"], key, target), steps_to(p[seed]["curve"], key, target)
        rows.append({"seed": seed, "target": target, "global_steps": steps_g, "pic_steps": steps_p,
                     "ratio": None if steps_p is None or not steps_g else steps_p / steps_g})  # None: never
    return rows


def _ratio_or_inf(row: dict) -> float:
    return math.inf if row["ratio"] is None else row["ratio"]


def pairs_finished(runs: list[dict], ratio: int) -> int:
    """How many seeds have both arms finished at ``ratio``."""
    return len(set(_by(runs, "global", ratio)) & set(_by(runs, "pic", ratio)))


def hypotheses(runs: list[dict], ratios: list[int], gains: list[dict], seeds: int | None = None) -> dict:
    """H1-H3 of the protocol (``mechanism``). With ``seeds`` (the grid's seed count) a hypothesis whose ratios
    lack a finished pair for some seed is not judged: its "held" is None and "missing" counts the pairs."""
    ratios = sorted(ratios)
    above, middle = ratios[1:] or ratios, ratios[len(ratios) // 2]
    h1 = {r: race(runs, r, "value_accuracy", lambda c: smoothed([p["value_accuracy"] for p in c])[-1])
          for r in above}
    h1_held = bool(h1) and all(sum(_ratio_or_inf(row) <= H1_RATIO for row in rows) >= 2 for rows in h1.values())
    by_ratio = {row["ratio"]: row for row in gains}
    trend = [by_ratio[r]["f1_gain"] for r in ratios if r in by_ratio]
    grows = len(trend) >= 2 and None not in trend and all(a < b for a, b in zip(trend, trend[1:]))
    top_ci = by_ratio.get(ratios[-1], {}).get("f1_ci", (None, None))
    above_zero = top_ci[0] is not None and top_ci[0] > 0
    h3_rows = race(runs, middle, "em", lambda c: max(smoothed([p["em"] for p in c])))
    h3_median = float(np.median([_ratio_or_inf(row) for row in h3_rows])) if h3_rows else math.nan
    out = {"H1": {"ratios": above, "per_seed": {str(r): rows for r, rows in h1.items()}, "held": h1_held},
           "H2": {"f1_gains": trend, "grows": grows, "top_ci": top_ci, "above_zero": above_zero,
                  "held": bool(grows and above_zero)},
           "H3": {"ratio": middle, "per_seed": h3_rows, "median": h3_median if math.isfinite(h3_median) else None,
                  "held": bool(h3_median <= H3_RATIO)}}
    for name, needed in (("H1", above), ("H2", ratios), ("H3", [middle])):
        missing = 0 if seeds is None else sum(seeds - pairs_finished(runs, r) for r in needed)
        out[name]["missing"] = missing
        if missing:
            out[name]["held"] = None  # cut short: not judged
    return out


def gap_steps(runs: list[dict], method: str, ratio: int, floor: float, ceiling: float) -> dict:
    """Steps (per seed) for a method's smoothed dev EM to close 25 / 50 / 75% of the reader's dev gap."""
    return {f"{f:g}": [steps_to(r["curve"], "em", floor + f * (ceiling - floor))
                       for _, r in sorted(_by(runs, method, ratio).items())] for f in GAP_FRACTIONS}


def by_paragraph(runs: list[dict]) -> list[float]:
    """Test F1 (%) by paragraph index, pooled over the runs' questions."""
    paragraph = np.concatenate([r["questions"]["paragraph"] for r in runs])
    f1 = np.concatenate([r["questions"]["f1"] for r in runs]).astype(float)
    return [100.0 * float(f1[paragraph == j].mean()) for j in range(int(paragraph.max()) + 1)]


def mean_curve(runs: list[dict]) -> list[dict]:
    """Dev curves averaged over seeds (steps as in the first run)."""
    keys = ("em", "repeat_loss", "value_accuracy")
    return [{"step": point["step"], **{k: float(np.mean([r["curve"][i][k] for r in runs])) for k in keys}}
            for i, point in enumerate(runs[0]["curve"])]


def summarise_mechanism(cfg, info: dict, protocol: dict, pilot: list[dict], grid: list[dict]) -> dict:
    """Every number the report prints, from the finished runs (``mechanism``)."""
    b = info["bounds"]
    full, none = b["test_full"]["f1"], b["test_none"]["f1"]
    groups: dict[tuple, list[dict]] = {}
    for r in grid:
        groups.setdefault((r["method"], r["ratio"]), []).append(r)
    table = []
    for (method, ratio), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        em, f1 = mean_sd(r["test"]["em"] for r in runs), mean_sd(r["test"]["f1"] for r in runs)
        wrong = sum(1 - e for r in runs for e in r["questions"]["em"])
        table.append({"method": method, "ratio": ratio, "num_memory": runs[0]["num_memory"], "seeds": len(runs),
                      "em": em[0], "em_sd": em[1], "f1": f1[0], "f1_sd": f1[1],
                      "gap_closed": None if full == none else (f1[0] - none) / (full - none),
                      "teacher_forced_em": float(np.mean([r["test"]["teacher_forced"]["em"] for r in runs])),
                      "f1_by_paragraph": by_paragraph(runs),
                      "wrong_from_other_paragraph": None if not wrong else
                      sum(x for r in runs for x in r["questions"]["from_other"]) / wrong,
                      "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
                      "curve": mean_curve(runs)})
    ratios = sorted(cfg.ratios)
    gains = [gains_at(grid, r) for r in ratios if _by(grid, "global", r) and _by(grid, "pic", r)]
    dev = protocol["bounds"]["dev"]
    floor, ceiling = dev["none"]["em"], dev["full"]["em"]
    return {"device": info.get("device"), "config": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in vars(cfg).items()},
            "reader": {"parameters": info["pretrain"]["parameters"], "steps": info["pretrain"]["steps"],
                       "seconds": info["pretrain"]["seconds"], "bounds": b, "dev_teacher_forced": dev},
            "protocol": protocol, "pilot": [{k: r[k] for k in ("method", "lr", "reader_lora", "curve")}
                                            for r in pilot],
            "table": table, "gains": gains,
            "hypotheses": hypotheses(grid, ratios, gains, len(cfg.seeds)) if gains else None,
            "gap_steps": {f"{m}_{r}x": gap_steps(grid, m, r, floor, ceiling) for m in ("global", "pic")
                          for r in ratios if _by(grid, m, r)},
            "runs": [{k: r[k] for k in ("name", "method", "ratio", "seed", "num_memory", "train_seconds", "curve",
                                        "test", "questions", "examples", "qa_loss", "repeat_loss")} for r in grid]}
