"""The main job behind ``minimoe report``: one trace -> the findings and every placement and grouping method.

    trace      recorded from the bundled 4-domain MoE (or another minimoe run), or read from a trace file
               (.npz, or Parquet for traces beyond memory: read in batches, never whole)
    pass 1     one read of the trace: per-request expert counts, co-activation and a bounded sample of each
               fitting set's tokens (``minimoe.traces.stats``), in this process or on Dask workers
    findings   the three observations of the paper, each next to what chance alone gives
               (``minimoe.traces.findings``); a finding the trace cannot support says why and is skipped
    compare    for every topology and slot budget: contiguous, round-robin, EPLB, locality, grouping and
               grouping + locality, each fitted three ways (on prefill, on an online decode window, and as an
               oracle on the evaluated tokens) on those statistics, then measured exactly on every held-out
               decode token in a second read (``minimoe.placement.streaming``); the uniform-routing
               baseline; a domain-drift test
    partitioners  on request: the locality placement's node partitioners side by side, minimoe's FM
               refinement vs Mt-KaHyPar (when it is installed), fitted on prefill
    summary    one line per topology: what grouping + locality fitted on prefill saves

The result is a plain dict (JSON-ready) that ``format_report`` prints and ``minimoe.placement.report_html``
draws. Bytes assume hidden size 7168 in bf16 (DeepSeek-V3) unless told otherwise; every saving is a ratio of
bytes and does not depend on it.
"""

from __future__ import annotations

import time

import numpy as np

from minimoe.placement.engine import LocalEngine, longest_decode, run_passes
from minimoe.placement.experiments import FIT_MODES, METHODS, PARTITIONERS, uniform_baseline
from minimoe.placement.hypergraph import mtkahypar_available
from minimoe.placement.streaming import StreamedExperiments
from minimoe.placement.topology import Topology
from minimoe.traces.findings import findings_of_stats, format_findings
from minimoe.traces.stats import TraceStats

DRIFT_TOPOLOGY = (4, 2)
FIT_PAIRS = 1 << 16  # default sample of each fitting set: this many (token, expert) pairs, i.e. 65536 / top_k tokens
DRIFT_FIT = {"code": 0.4, "math": 0.4, "chat": 0.1, "general": 0.1}
DRIFT_EVAL = {"code": 0.1, "math": 0.1, "chat": 0.4, "general": 0.4}


def check_topologies(topologies: list[Topology], num_experts: int) -> None:
    """Raise ValueError naming every topology whose GPUs cannot hold ``num_experts`` experts evenly."""
    bad = [reason for topology in topologies if (reason := topology.fits(num_experts))]
    if bad:
        raise ValueError("; ".join(bad))


def slot_budgets(num_experts: int, topology: Topology) -> list[int]:
    """Slots per layer compared on a topology: no spare slot, and one spare slot per GPU (replicas)."""
    return [num_experts, num_experts + topology.num_gpus]


def trace_summary(stats: TraceStats) -> dict:
    tokens = stats.tokens.sum(0)  # (4,) per token class
    return dict(model=stats.model or "(unnamed)", requests=stats.num_requests, tokens=stats.num_tokens,
                prefill_tokens=int(tokens[0]), decode_tokens=int(tokens[1] + tokens[2]),
                layers=stats.num_layers, experts=stats.num_experts, top_k=stats.top_k)


def check_window(window, longest: int) -> None:
    """Raise ValueError unless ``window`` leaves held-out decode tokens (those after the first ``window``)."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"the online window must be an integer >= 1 (decode tokens per request to fit on), "
                         f"got {window!r}")
    if window >= longest:
        raise ValueError(f"no decode token lies after the online window of {window} tokens: the longest request "
                         f"decodes {longest}; use a window of at most {longest - 1}")


def run_report(trace, topologies: list[Topology], window: int | None = None, seed: int = 0,
               hidden_size: int = 7168, progress=None, max_fit_tokens: int | str | None = "auto",
               engine=None, compare_partitioners: bool = False) -> dict:
    """Everything the report shows, as a dict. ``trace``: a Trace or a ``minimoe.traces.parquet.ParquetTrace``.
    ``window=None`` picks a quarter of the longest request's decode, 1 to 8 (``experiments.default_window``);
    ``max_fit_tokens``: the size of each fitting set's sample ("auto": ``FIT_PAIRS // top_k``, the fit's cost
    growing with its (token, expert) pairs; None: every token); ``engine``: where the two
    passes run (``minimoe.placement.engine``; default in this process); ``compare_partitioners``: also fit the
    locality placement with each node partitioner. ``progress(str)``, if given, is called before each slow
    step. Raises ValueError for a topology the trace cannot fill or a window that leaves no held-out decode
    token."""
    say = progress or (lambda message: None)
    check_topologies(topologies, trace.num_experts)
    longest = longest_decode(trace)
    if longest:
        window = min(8, max(1, longest // 4)) if window is None else window
        check_window(window, longest)
    engine = engine or LocalEngine()
    if max_fit_tokens == "auto":
        max_fit_tokens = max(1, FIT_PAIRS // trace.top_k)
    sample_size = max(trace.num_tokens, 1) if max_fit_tokens is None else max_fit_tokens
    say(f"pass 1 ({engine.name}): statistics of every token, at most {sample_size:,} sampled per fitting set")
    stats = run_passes(trace, engine, window or 0, sample_size, seed)
    result = dict(trace=trace_summary(stats), hidden_size=hidden_size, unavailable={},
                  max_fit_tokens=max_fit_tokens, engine=engine.name)
    say("findings: imbalance, domain specificity, prefill -> decode")
    result["findings"] = findings_of_stats(stats, seed=seed)
    if not longest:
        result["unavailable"]["compare"] = ("the trace has no decode tokens (phase 1); placements are measured "
                                            "on held-out decode traffic")
        result.update(window=None, rows=[], partitioners=[], uniform=[], drift=None)
        return result
    result["window"] = window
    experiments = StreamedExperiments(stats, seed, hidden_size)
    for topology in topologies:
        for num_replicas in slot_budgets(stats.num_experts, topology):
            say(f"placement and grouping: {topology} ({topology.num_gpus} GPUs), {num_replicas} slots per layer")
            experiments.compare(topology, num_replicas)
    partitioners = PARTITIONERS if mtkahypar_available() else ("fm",)
    if not compare_partitioners:
        result["unavailable"]["partitioners"] = "not run (minimoe report --compare-partitioners runs it)"
    else:
        if "mtkahypar" not in partitioners:
            result["unavailable"]["mtkahypar"] = ("Mt-KaHyPar is not installed (pip install mtkahypar, or "
                                                  "pip install 'minimoe[partition]')")
        for topology in topologies:
            for num_replicas in slot_budgets(stats.num_experts, topology):
                say(f"locality partitioners ({', '.join(partitioners)}): {topology}, {num_replicas} slots per layer")
                experiments.compare_partitioners(topology, num_replicas, partitioners)
    result["uniform"] = [uniform_baseline(stats, topology) for topology in topologies]
    result["drift"] = None
    if not (stats.has_domain and set(DRIFT_FIT) <= set(stats.domain)):
        result["unavailable"]["drift"] = f"needs requests of the domains {sorted(DRIFT_FIT)}"
    else:
        topology = Topology(num_nodes=DRIFT_TOPOLOGY[0], gpus_per_node=DRIFT_TOPOLOGY[1])
        if topology.fits(stats.num_experts):
            result["unavailable"]["drift"] = topology.fits(stats.num_experts)
        else:
            say(f"drift at {topology}")
            try:
                experiments.drift(topology, DRIFT_FIT, DRIFT_EVAL)
                result["drift"] = dict(topology=str(topology))
            except ValueError as error:
                result["unavailable"]["drift"] = str(error)
    jobs, index = experiments.unique_jobs()
    say(f"pass 2 ({engine.name}): {len(jobs)} distinct placements measured on every held-out decode token")
    counts = engine.pass_two(trace, window, jobs)
    measured = experiments.results([counts[i] for i in index])
    result["rows"], result["partitioners"] = measured["rows"], measured["partitioners"]
    if result["drift"] is not None:
        result["drift"]["rows"] = measured["drift"]
    return result


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def _fewer(value) -> str:
    if value is None:
        return "n/a"
    return f"{abs(value):.1%} {'fewer' if value >= 0 else 'more'}"


def summary_lines(rows: list[dict]) -> list[str]:
    """What grouping + locality, fitted on prefill, saves on each topology and slot budget."""
    lines = []
    for r in rows:
        if r["method"] == "grouping+locality" and r["fit"] == "prefill":
            if r["cut_vs_contiguous"] is None:
                lines.append(f"  {r['topology']}, {r['num_replicas']} slots: one node, no inter-node traffic")
                continue
            lines.append(f"  {r['topology']}, {r['num_replicas']} slots: {_fewer(r['cut_vs_contiguous'])} inter-node "
                         f"bytes than contiguous, {_fewer(r['cut_vs_eplb'])} than EPLB; tokens per GPU max/mean "
                         f"{r['load_max_over_mean']:.2f}")
    return lines


def format_table(rows: list[dict]) -> str:
    """Saving in de-duplicated inter-node bytes vs contiguous (per-pair saving in brackets) and load max/mean,
    per method and fit mode."""
    lines = ["topology slots  method              " + "  ".join(f"{m:>21s}" for m in FIT_MODES),
             "                                     " + "  ".join(f"{'saved (pair)  load':>21s}" for _ in FIT_MODES)]
    keyed = {(r["topology"], r["num_replicas"], r["method"], r["fit"]): r for r in rows}
    for topology, slots in dict.fromkeys((r["topology"], r["num_replicas"]) for r in rows):
        for method in METHODS:
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
    lines = ["Locality placement by node partitioner (minimoe.placement.locality), fitted on prefill with random "
             "request sources,\nthe same slots and node load cap; saved = de-duplicated inter-node bytes vs "
             "contiguous / vs EPLB on held-out decode tokens:"]
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


def format_report(result: dict) -> str:
    """The report as plain text (what ``minimoe report`` prints and writes to report.txt)."""
    sections = [format_findings(result["findings"])]  # opens with the one-line trace summary
    if "compare" in result["unavailable"]:
        sections.append(f"Placement and grouping: not measured: {result['unavailable']['compare']}")
        return "\n\n".join(sections)
    window = result["window"]
    sections.append(
        f"Placement and grouping, measured on held-out decode tokens (each request's decode tokens after the "
        f"first {window}).\n"
        "saved = how much less than contiguous placement a method moves across node boundaries, in "
        "de-duplicated bytes\n(a token crosses to a node once however many of its experts live there); in "
        "brackets the same for per-(token, expert) bytes;\nload = tokens per GPU, max / mean. Fitted on: "
        "prefill tokens | the first decode tokens (online) | the evaluated tokens themselves (oracle)"
        + _fitted_on(result) + ".\n\n"
        + format_table(result["rows"]))
    sections.append("Summary, fitted on prefill:\n" + "\n".join(summary_lines(result["rows"])))
    sections.append(format_partitioners(result.get("partitioners", []), result["unavailable"].get("mtkahypar"),
                                        result["unavailable"].get("partitioners")))
    sections.append("Nodes a token would reach if routing were uniform (the contiguous baseline's expectation): "
                    + ", ".join(f"{u['topology']}: {u['uniform_nodes_per_token']:.3f} "
                                f"({u['uniform_remote_nodes_per_token']:.3f} remote)" for u in result["uniform"]))
    if result["drift"]:
        d = result["drift"]
        sections.append(f"Drift at {d['topology']} (fitted on requests 80% code+math, measured on other requests "
                        "80% chat+general):\n" + "\n".join(
                            f"  {r['method']:18s} saved vs contiguous {_pct(r['cut_vs_contiguous'])}, vs EPLB "
                            f"{_pct(r['cut_vs_eplb'])}, load {r['load_max_over_mean']:.2f}" for r in d["rows"]))
    elif "drift" in result["unavailable"]:
        sections.append(f"Drift: not measured: {result['unavailable']['drift']}")
    return "\n\n".join(sections)


def _fitted_on(result: dict) -> str:
    """What the fits saw: every fitting token, or a sample of at most max_fit_tokens per fitting set."""
    limit = result.get("max_fit_tokens")
    if limit is None or limit >= result["trace"]["tokens"]:
        return ""
    return (f";\nco-activation fitted on a uniform sample of at most {limit:,} tokens per fitting set (loads and "
            "request signatures on all of them), every saving measured on all held-out tokens")


def json_ready(value):
    """Convert numpy scalars/arrays inside ``value`` to plain Python (for json.dumps)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class Stopwatch:
    """``progress`` messages with the elapsed time, e.g. ``[  12 s] drift at 4x2``, written by ``write``."""

    def __init__(self, write):
        self.start, self.write = time.perf_counter(), write

    def __call__(self, message: str) -> None:
        self.write(f"[{time.perf_counter() - self.start:5.0f} s] {message}")
