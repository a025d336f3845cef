"""The main job's report as plain text: what ``minimoe report`` prints and writes to report.txt.

``format_report`` turns the dict of ``minimoe.placement.report.run_report`` into sections: the findings
(``minimoe.traces.findings_table``), the table of every placement and grouping method by fit mode (saving in
de-duplicated inter-node bytes vs contiguous, per-pair saving in brackets, load max/mean), one summary line per
topology, the partitioner comparison, the uniform-routing baseline, the drift test and the decision
(``minimoe.placement.decision``). It computes nothing: every number is already in the dict.
"""

from __future__ import annotations

from minimoe.placement.decision import format_decision, format_methods
from minimoe.placement.experiments import FIT_MODES, METHODS
from minimoe.placement.splits import LABELS
from minimoe.traces.findings_table import format_findings


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def _fewer(value) -> str:
    if value is None:
        return "n/a"
    return f"{abs(value):.1%} {'fewer' if value >= 0 else 'more'}"


def summary_lines(rows: list[dict], method: str = "grouping+locality") -> list[str]:
    """What ``method``, fitted on prefill (or what stands in for it), saves on each topology and slot budget."""
    lines = []
    for r in rows:
        if r["method"] == method and r["fit"] == "prefill":
            if r["cut_vs_contiguous"] is None:
                lines.append(f"  {r['topology']}, {r['num_replicas']} slots: one node, no inter-node traffic")
                continue
            lines.append(f"  {r['topology']}, {r['num_replicas']} slots: {_fewer(r['cut_vs_contiguous'])} inter-node "
                         f"bytes than contiguous, {_fewer(r['cut_vs_eplb'])} than EPLB; (token, expert) pairs per "
                         f"GPU max/mean {r['load_max_over_mean']:.2f}")
    return lines


def format_table(rows: list[dict], labels: dict | None = None) -> str:
    """Saving in de-duplicated inter-node bytes vs contiguous (per-pair saving in brackets) and load max/mean,
    per method and fit mode (``labels``: the column name of each fit mode)."""
    labels = labels or {m: m for m in FIT_MODES}
    lines = ["topology slots  method              " + "  ".join(f"{labels[m]:>21s}" for m in FIT_MODES),
             "                                     " + "  ".join(f"{'saved (pair)  load':>21s}" for _ in FIT_MODES)]
    keyed = {(r["topology"], r["num_replicas"], r["method"], r["fit"]): r for r in rows}
    for topology, slots in dict.fromkeys((r["topology"], r["num_replicas"]) for r in rows):
        for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
            cells = []
            for mode in FIT_MODES:
                r = keyed.get((topology, slots, method, mode))
                cells.append("—" if r is None else f"{_pct(r['cut_vs_contiguous'])} ({_pct(r['pair_cut_vs_contiguous'])})"
                                                   f" {r['load_max_over_mean']:4.2f}")
            lines.append(f"{topology:8s} {slots:5d}  {method:18s}  " + "  ".join(f"{c:>21s}" for c in cells))
        if keyed[(topology, slots, "contiguous", "prefill")]["cut_vs_contiguous"] is None:
            lines.append("  (one node: nothing crosses a node boundary, so there is no saving to measure)")
        lines.append("")
    return "\n".join(lines)


def format_partitioners(rows: list[dict], missing: str | None = None, not_run: str | None = None) -> str:
    """The locality placement with each node partitioner: saving vs contiguous and EPLB, and load max/mean."""
    if not_run:
        return f"Locality placement by node partitioner: {not_run}"
    lines = ["Locality placement by node partitioner (minimoe.placement.locality), fitted as the table's first "
             "column with random request sources,\nthe same slots and node load cap; saved = de-duplicated inter-node "
             "bytes vs contiguous / vs EPLB on the held-out tokens:"]
    keyed = {(r["topology"], r["num_replicas"]): [] for r in rows}
    for r in rows:
        keyed[(r["topology"], r["num_replicas"])].append(r)
    for (topology, slots), group_rows in keyed.items():
        for r in group_rows:
            if r["method"].startswith("locality["):
                lines.append(f"  {topology:8s} {slots:5d} slots  {r['method']:20s} saved "
                             f"{_pct(r['cut_vs_contiguous'])} / {_pct(r['cut_vs_eplb'])}, "
                             f"load {r['load_max_over_mean']:.2f}")
    if missing:
        lines.append(f"  (Mt-KaHyPar not compared: {missing})")
    return "\n".join(lines)


def _fitted_on(kind: str) -> str:
    return {"phase": "prefill tokens | the first decode tokens (online) | the evaluated tokens themselves (oracle)",
            "time": "each request's first half | the next tokens (online) | the evaluated tokens themselves (oracle)",
            "request": "the earlier requests | — | the evaluated tokens themselves (oracle)"}[kind]


def format_report(result: dict, folder: str | None = None) -> str:
    """The report as plain text (what ``minimoe report`` prints and writes to report.txt); ``folder``: where the
    placement files were saved (named in the decision)."""
    sections = [format_findings(result["findings"])]  # opens with the one-line trace summary
    if "compare" in result["unavailable"]:
        sections.append(f"Placement and grouping: not measured: {result['unavailable']['compare']}")
        return "\n\n".join(sections)
    window, kind = result["window"], result["split"]["kind"]
    measured_on = (f"held-out decode tokens (each request's decode tokens after the first {window})" if kind == "phase"
                   else f"held-out tokens: {result['split']['description']}")
    sections.append(
        f"Placement and grouping, measured on {measured_on}.\n"
        "saved = how much less than contiguous placement a method moves across node boundaries, in "
        "de-duplicated bytes\n(a token crosses to a node once however many of its experts live there); in "
        "brackets the same for per-(token, expert) bytes;\nload = (token, expert) pairs each GPU computes, max / mean. "
        "Fitted on: "
        f"{_fitted_on(kind)}" + _sampled_note(result) + ".\n\n" + format_table(result["rows"], LABELS[kind])
        + format_methods(dict.fromkeys(r["method"] for r in result["rows"])))
    best = "grouping+locality" if kind != "request" else "locality"
    sections.append(f"Summary, {best} fitted on {LABELS[kind]['prefill'] if kind != 'phase' else 'prefill'}:\n"
                    + "\n".join(summary_lines(result["rows"], best)))
    sections.append(format_partitioners(result.get("partitioners", []), result["unavailable"].get("mtkahypar"),
                                        result["unavailable"].get("partitioners")))
    sections.append("Nodes a token would reach if routing were uniform (the contiguous baseline's expectation): "
                    + ", ".join(f"{u['topology']}: {u['uniform_nodes_per_token']:.3f} "
                                f"({u['uniform_remote_nodes_per_token']:.3f} remote)" for u in result["uniform"]))
    if result["drift"]:
        d = result["drift"]
        sections.append(f"Drift at {d['topology']}, {d['chosen']} (fitted on requests "
                        "80% code+math, measured on other requests "
                        "80% chat+general):\n" + "\n".join(
                            f"  {r['method']:18s} saved vs contiguous {_pct(r['cut_vs_contiguous'])}, vs EPLB "
                            f"{_pct(r['cut_vs_eplb'])}, load {r['load_max_over_mean']:.2f}" for r in d["rows"]))
    elif "drift" in result["unavailable"]:
        sections.append(f"Drift: not measured: {result['unavailable']['drift']}")
    if result.get("decision"):
        sections.append(format_decision(result["decision"], folder, result["split"].get("eval_tokens")))
    return "\n\n".join(sections)


def _sampled_note(result: dict) -> str:
    """What the fits saw: every fitting token, or a sample of at most max_fit_tokens per fitting set."""
    limit = result.get("max_fit_tokens")
    if limit is None or limit >= result["trace"]["tokens"]:
        return ""
    tokens = "token" if limit == 1 else "tokens"
    return (f";\nco-activation fitted on a uniform sample of at most {limit:,} {tokens} per fitting set (loads and "
            "request signatures on all of them), every saving measured on all held-out tokens")
