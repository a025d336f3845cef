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
    decision   per topology, the placement (and grouping) to deploy, its saving and load in one line, every
               method defined, and the files and export command (``minimoe.placement.decision``)

A trace without prefill/decode phases (most serving logs) is split in time or by request instead
(``minimoe.placement.splits``), and the report says which split it used.

The result is a plain dict (JSON-ready) that ``minimoe.placement.report_text.format_report`` prints and
``minimoe.placement.report_html`` draws. Bytes assume hidden size 7168 in bf16 (DeepSeek-V3) unless told
otherwise; every saving is a ratio of bytes and does not depend on it.
"""

from __future__ import annotations

import time

import numpy as np

from minimoe.placement.decision import decide
from minimoe.placement.engine import LocalEngine, run_passes
from minimoe.placement.experiments import PARTITIONERS, uniform_baseline
from minimoe.placement.fitdata import auto_fit_tokens
from minimoe.placement.splits import choose_split, split
from minimoe.placement.hypergraph import mtkahypar_available
from minimoe.placement.parallel_fits import auto_processes
from minimoe.placement.streaming import StreamedExperiments
from minimoe.placement.topology import Topology
from minimoe.traces.findings import findings_of_stats
from minimoe.traces.format import Trace
from minimoe.traces.stats import ClassRule, TraceStats

DRIFT_TOPOLOGY = (4, 2)
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


def drift_topology(topologies: list[Topology]) -> tuple[Topology, str]:
    """The topology the drift test runs on, and why: ``DRIFT_TOPOLOGY`` when it is among ``topologies``, else the
    first of them (the drift test is fitted and measured on one topology only)."""
    for topology in topologies:
        if (topology.num_nodes, topology.gpus_per_node) == DRIFT_TOPOLOGY:
            return topology, "the reference topology"
    return topologies[0], "the first topology compared"


def trace_summary(stats: TraceStats) -> dict:
    return dict(model=stats.model or "(unnamed)", requests=stats.num_requests, tokens=stats.num_tokens,
                prefill_tokens=int(stats.phase_tokens(0).sum()), decode_tokens=int(stats.phase_tokens(1).sum()),
                layers=stats.num_layers, experts=stats.num_experts, top_k=stats.top_k)


def run_report(trace, topologies: list[Topology], window: int | None = None, seed: int = 0,
               hidden_size: int = 7168, progress=None, fitted: dict | None = None,
               max_fit_tokens: int | str | None = "auto", engine=None, compare_partitioners: bool = False,
               fit_processes: int | str = 1) -> dict:
    """Everything the report shows, as a dict. ``trace``: a Trace or a ``minimoe.traces.parquet.ParquetTrace``.
    ``window=None`` picks the split's default (``minimoe.placement.splits``); ``fitted``: a dict that receives
    ``(topology, num_replicas, method) -> (placement, sources)`` of the fits on the first fitting set (for
    ``save_decision``); ``max_fit_tokens``: the size of each fitting set's sample (None: every token;
    "auto": ``minimoe.placement.fitdata.auto_fit_tokens``); ``engine``: where the
    two passes run (``minimoe.placement.engine``; default in this process); ``compare_partitioners``: also fit
    the locality placement with each node partitioner; ``fit_processes``: worker processes for the fits (an
    int, or "auto": ``minimoe.placement.parallel_fits.auto_processes``). ``progress(str)``, if given, is called
    before each slow step. Raises ValueError for a topology the trace cannot fill or a window that leaves no
    held-out token."""
    say = progress or (lambda message: None)
    check_topologies(topologies, trace.num_experts)
    chosen, unavailable = None, None
    try:
        chosen = choose_split(trace, window)
    except ValueError as error:
        if window is not None and "window" in str(error):
            raise  # the message says which window leaves no held-out token, and the largest that does
        unavailable = str(error)
    engine = engine or LocalEngine()
    if max_fit_tokens == "auto":
        max_fit_tokens = auto_fit_tokens(trace.num_tokens, trace.top_k)
    sample_size = max(trace.num_tokens, 1) if max_fit_tokens is None else max_fit_tokens
    kept = "every fitting token kept for the fits" if max_fit_tokens is None else \
        f"at most {sample_size:,} sampled per fitting set"
    say(f"pass 1 ({engine.name}): statistics of every token, {kept}")
    stats = run_passes(trace, engine, chosen.rule if chosen else ClassRule("phase", 0), sample_size, seed)
    result = dict(trace=trace_summary(stats), hidden_size=hidden_size, unavailable={},
                  max_fit_tokens=max_fit_tokens, engine=engine.name)
    say("findings: imbalance, domain specificity, prefill -> decode")
    result["findings"] = findings_of_stats(stats, seed=seed, layer_ids=getattr(trace, "layer_ids", None))
    if chosen is None:
        result["unavailable"]["compare"] = unavailable
        result.update(window=None, split=None, rows=[], partitioners=[], uniform=[], drift=None, decision=[])
        return result
    result["window"] = chosen.window
    result["split"] = dict(kind=chosen.kind, window=chosen.window, description=chosen.description,
                           eval_tokens=int(stats.class_tokens((2,)).sum()))
    experiments = StreamedExperiments(stats, seed, hidden_size)
    tasks = [(topology, num_replicas) for topology in topologies
             for num_replicas in slot_budgets(stats.num_experts, topology)]
    if fit_processes == "auto":
        fit_processes = auto_processes(stats.top_k * max(experiments.fit_data(mode).num_tokens
                                                         for mode in chosen.fit_modes))
    experiments.compare_many(tasks, chosen.fit_modes, chosen.methods, fit_processes, say)
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
    if chosen.kind != "phase":
        result["unavailable"]["drift"] = "needs prefill and decode phases"
    elif not (stats.has_domain and set(DRIFT_FIT) <= set(stats.domain)):
        result["unavailable"]["drift"] = (f"needs requests of the domains {sorted(DRIFT_FIT)}, the mixes this test "
                                          "draws (minimoe.placement.experiments.drift takes any mix of a trace's "
                                          "own domains)")
    else:
        topology, why = drift_topology(topologies)
        say(f"drift at {topology}")
        try:
            experiments.drift(topology, DRIFT_FIT, DRIFT_EVAL)
            result["drift"] = dict(topology=str(topology), chosen=why)
        except ValueError as error:
            result["unavailable"]["drift"] = str(error)
    jobs, index = experiments.unique_jobs()
    say(f"pass 2 ({engine.name}): {len(jobs)} distinct placements measured on every held-out token")
    counts = engine.pass_two(trace, chosen.rule, jobs)
    measured = experiments.results([counts[i] for i in index])
    result["rows"], result["partitioners"] = measured["rows"], measured["partitioners"]
    if result["drift"] is not None:
        result["drift"]["rows"] = measured["drift"]
    result["decision"] = decide(result["rows"], topologies)
    if fitted is not None:
        fitted.update(experiments.fitted)
    return result


def save_decision(trace: Trace, result: dict, topologies: list[Topology], folder, seed: int = 0,
                  fitted: dict | None = None) -> list[str]:
    """Write each topology's recommended placement (``minimoe.placement.deployment``) into ``folder``: the one
    ``run_report(..., fitted=)`` kept, else refitted exactly as it was fitted; returns the file names (also listed
    in ``result["decision"]``)."""
    from pathlib import Path

    from minimoe.placement.decision import deployments

    if not result.get("decision"):
        return []
    token_sets = {}  # only needed to refit what ``fitted`` lacks: a file's placements always come from run_report
    if isinstance(trace, Trace):
        token_sets = split(trace, result["split"]["window"], result["split"]["kind"]).masks
    names = []
    for name, deployment in deployments(trace, result["decision"], topologies, token_sets,
                                        result["split"], seed, fitted):
        deployment.save(Path(folder) / name)
        names.append(name)
    return names


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
