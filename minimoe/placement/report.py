"""``minimoe report``: the main job. Traces -> every placement and grouping method -> a table and an HTML report.

    trace     recorded from the bundled 4-domain MoE (or ``--model DIR``), or read from ``--trace FILE``
    findings  the paper's three observations, each next to its baseline (``minimoe.traces.findings``)
    compare   for every topology and replica budget: contiguous, round-robin, EPLB, locality, grouping,
              grouping + locality, each fitted three ways (prefill / online window / oracle) and measured on
              held-out decode tokens (``minimoe.placement.experiments``); the uniform-routing baseline; drift
    targets   the issue's bar at 4 nodes x 2 GPUs, printed as PASS / MISS with the measured numbers
    HTML      figures (plotly.js embedded once, so the file opens offline) and the tables

Bytes assume hidden size 7168 in bf16 (DeepSeek-V3) unless ``--hidden-size`` says otherwise; every reduction
is a ratio and does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from minimoe.placement.experiments import DEFAULT_TOPOLOGIES, FIT_MODES, METHODS, compare, drift, uniform_baseline
from minimoe.placement.topology import Topology
from minimoe.traces.format import Trace

TARGET_TOPOLOGY = (4, 2)


def build_trace(args) -> Trace:
    if args.trace:
        return Trace.load(args.trace)
    from minimoe.traces.workload import BUNDLED_MODEL, bundled_trace

    return bundled_trace(num_per_domain=args.requests_per_domain, max_new_tokens=args.new_tokens, seed=args.seed,
                         model_dir=args.model or BUNDLED_MODEL, temperature=args.temperature)


def run_comparisons(trace: Trace, topologies, window: int, seed: int, hidden_size: int) -> list[dict]:
    rows = []
    for nodes, gpus in topologies:
        topology = Topology(num_nodes=nodes, gpus_per_node=gpus)
        for num_replicas in (trace.num_experts, trace.num_experts + topology.num_gpus):
            if (num_replicas % topology.num_gpus) or num_replicas < trace.num_experts:
                continue  # this budget does not fit the topology (e.g. E not divisible by the GPU count)
            rows += compare(trace, topology, num_replicas, window=window, seed=seed, hidden_size=hidden_size)
    return rows


def format_table(rows: list[dict]) -> str:
    """Reduction of de-duplicated inter-node bytes vs contiguous, per method and fit mode; load max/mean."""
    lines = ["topology slots  method              " + "  ".join(f"{m:>19s}" for m in FIT_MODES),
             "                                     " + "  ".join(f"{'cut(pair) load':>19s}" for _ in FIT_MODES)]
    keyed = {(r["topology"], r["num_replicas"], r["method"], r["fit"]): r for r in rows}
    for topology, slots in dict.fromkeys((r["topology"], r["num_replicas"]) for r in rows):
        for method in METHODS:
            cells = []
            for mode in FIT_MODES:
                r = keyed.get((topology, slots, method, mode))
                cells.append("—" if r is None else f"{r['cut_vs_contiguous']:+6.1%}({r['pair_cut_vs_contiguous']:+5.1%}) "
                                                   f"{r['load_max_over_mean']:4.2f}")
            lines.append(f"{topology:8s} {slots:5d}  {method:18s}  " + "  ".join(f"{c:>19s}" for c in cells))
        lines.append("")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's bar at 4x2, fitted on prefill: >=35% vs contiguous, >=20% vs EPLB, load max/mean <= 1.25."""
    topology = f"{TARGET_TOPOLOGY[0]}x{TARGET_TOPOLOGY[1]}"
    out = []
    for r in rows:
        if r["topology"] == topology and r["method"] == "grouping+locality" and r["fit"] == "prefill":
            checks = [("cut vs contiguous >= 35%", r["cut_vs_contiguous"] >= 0.35, f"{r['cut_vs_contiguous']:.1%}"),
                      ("cut vs EPLB >= 20%", r["cut_vs_eplb"] >= 0.20, f"{r['cut_vs_eplb']:.1%}"),
                      ("load max/mean <= 1.25", r["load_max_over_mean"] <= 1.25, f"{r['load_max_over_mean']:.3f}")]
            for name, ok, value in checks:
                out.append(f"{'PASS' if ok else 'MISS'}  {topology}, {r['num_replicas']} slots/layer, grouping+locality "
                           f"fitted on prefill: {name}: {value}")
    return out


def write_html(path: Path, text: str, rows: list[dict], trace: Trace) -> None:
    import plotly.graph_objects as go

    figures = []
    for mode in FIT_MODES:
        fig = go.Figure()
        for method in METHODS[1:]:
            picked = [r for r in rows if r["method"] == method and r["fit"] == mode]
            fig.add_bar(name=method, x=[f"{r['topology']} / {r['num_replicas']}" for r in picked],
                        y=[100 * r["cut_vs_contiguous"] for r in picked])
        fig.update_layout(title=f"inter-node bytes saved vs contiguous (%), fitted on {mode}",
                          xaxis_title="topology / slots per layer", yaxis_title="% less than contiguous",
                          barmode="group", height=420)
        figures.append(fig)
    load = go.Figure()
    for method in METHODS:
        picked = [r for r in rows if r["method"] == method and r["fit"] == "prefill"]
        load.add_scatter(name=method, mode="markers", x=[f"{r['topology']} / {r['num_replicas']}" for r in picked],
                         y=[r["load_max_over_mean"] for r in picked])
    load.add_hline(y=1.25, line_dash="dot", annotation_text="1.25")
    load.update_layout(title="tokens per GPU, max / mean, on the evaluated decode tokens (fitted on prefill)",
                       height=380)
    figures.append(load)
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    html = (f"<html><head><meta charset='utf-8'><title>minimoe report</title></head><body>"
            f"<h1>minimoe report: {trace.model or 'trace'}</h1>" + "".join(parts)
            + f"<pre>{text}</pre></body></html>")
    path.write_text(html)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minimoe report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", help="a trace .npz (minimoe.traces.format format); default: record the model")
    parser.add_argument("--model", help="a minimoe run directory to record (default: the bundled checkpoint)")
    parser.add_argument("--requests-per-domain", type=int, default=500)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode tokens per request")
    parser.add_argument("--temperature", type=float, default=0.7, help="decode sampling temperature (0 = greedy)")
    parser.add_argument("--window", type=int, default=8, help="decode tokens in the online fitting window")
    parser.add_argument("--topologies", default=",".join(f"{n}x{g}" for n, g in DEFAULT_TOPOLOGIES))
    parser.add_argument("--hidden-size", type=int, default=7168)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="report", help="directory for report.html, report.txt, rows.json, trace.npz")
    args = parser.parse_args(argv)
    topologies = [tuple(int(x) for x in t.split("x")) for t in args.topologies.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    trace = build_trace(args)
    if not args.trace:
        trace.save(out / "trace.npz")
    sections = [f"trace: {trace.model or '?'}: {trace.num_requests} requests, {trace.num_tokens} tokens "
                f"({int((trace.phase == 0).sum())} prefill, {int((trace.phase == 1).sum())} decode), "
                f"{trace.num_layers} MoE layers, {trace.num_experts} experts, top-{trace.top_k}"]
    try:
        from minimoe.traces.findings import findings, format_findings

        sections.append(format_findings(findings(trace, seed=args.seed)))
    except ImportError:  # the findings module is optional for traces without domains or decode tokens
        pass
    rows = run_comparisons(trace, topologies, args.window, args.seed, args.hidden_size)
    sections.append("De-duplicated inter-node bytes on held-out decode tokens: reduction vs contiguous "
                    "(per-(token, expert) inter-node bytes in brackets) and tokens per GPU max/mean\n\n"
                    + format_table(rows))
    uniform = [uniform_baseline(trace, Topology(num_nodes=n, gpus_per_node=g)) for n, g in topologies]
    sections.append("uniform-routing baseline, nodes reached per token: " + ", ".join(
        f"{u['topology']}: {u['uniform_nodes_per_token']:.3f} ({u['uniform_remote_nodes_per_token']:.3f} remote)"
        for u in uniform))
    if trace.has_domain and {"code", "math", "chat", "general"} <= set(trace.request_domains()):
        topology = Topology(num_nodes=TARGET_TOPOLOGY[0], gpus_per_node=TARGET_TOPOLOGY[1])
        drift_rows = drift(trace, topology, {"code": 0.4, "math": 0.4, "chat": 0.1, "general": 0.1},
                           {"code": 0.1, "math": 0.1, "chat": 0.4, "general": 0.4}, seed=args.seed,
                           hidden_size=args.hidden_size)
        sections.append("drift at 4x2 (fit on 80% code+math requests, evaluate on 80% chat+general):\n" + "\n".join(
            f"  {r['method']:18s} cut vs contiguous {r['cut_vs_contiguous']:+.1%}, vs EPLB {r['cut_vs_eplb']:+.1%}, "
            f"load {r['load_max_over_mean']:.2f}" for r in drift_rows))
    sections.append("\n".join(check_targets(rows)))
    sections.append(f"done in {time.perf_counter() - start:.0f} s")
    text = "\n\n".join(sections)
    print(text)
    (out / "report.txt").write_text(text + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_html(out / "report.html", text, rows, trace)
    print(f"\nwrote {out / 'report.html'}, {out / 'report.txt'}, {out / 'rows.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
