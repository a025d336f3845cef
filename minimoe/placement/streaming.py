"""The experiments of ``minimoe.placement.experiments`` on a trace of any size, in two passes.

    pass 1   statistics of every token (``minimoe.traces.stats``): per-request expert counts per class
             (prefill, online window, held out), co-activation, and a bottom-k sample of each fitting set
    fits     every method of ``experiments.fit`` on a ``FitData`` per fitting set: exact counts for loads and
             signatures, the sample (at most ``max_fit_tokens`` tokens) for hyperedges
    pass 2   every fitted (placement, sources) measured exactly on every held-out token
             (``minimoe.placement.evaluate``), all of them in one read of the trace

The rows have the keys of ``experiments.compare``, ``compare_partitioners`` and ``drift``; with
``max_fit_tokens=None`` (no sampling) they are the same numbers as those functions give on the trace in
memory (tests/test_streaming.py). ``StreamedExperiments`` collects the fits of every topology first, so one
pass 2 serves them all.
"""
from __future__ import annotations

import time

import numpy as np

from minimoe.placement.evaluate import Job
from minimoe.placement.experiments import FIT_MODES, METHODS, cut, drift_requests, fit
from minimoe.placement.fitdata import FitData
from minimoe.placement.grouping import group
from minimoe.placement.methods import place
from minimoe.placement.topology import Topology
from minimoe.traces.stats import TraceStats

HELD_OUT = (2,)        # token class of the held-out decode tokens
DECODE = (1, 2)        # every decode token (the drift test measures new requests' whole decode)


class StreamedExperiments:
    """Fits on ``stats`` now, rows once ``measure(counts)`` has the pass-2 counts of ``jobs``."""

    def __init__(self, stats: TraceStats, seed: int = 0, hidden_size: int = 7168):
        self.stats, self.seed, self.hidden_size = stats, seed, hidden_size
        self.jobs: list[Job] = []
        self.pending: list = []  # (kind, description, job indices)
        self._fit_data: dict = {}
        self.cache: dict = {}  # node partitions of identical inputs, reused (minimoe.placement.locality)
        self.fitted: dict = {}  # (topology, num_replicas, method) -> (placement, sources), first fitting set

    def fit_data(self, mode: str) -> FitData:
        if mode not in self._fit_data:
            self._fit_data[mode] = FitData.of_stats(self.stats, mode)
        return self._fit_data[mode]

    def _job(self, placement, sources, classes=HELD_OUT, requests=None) -> int:
        self.jobs.append(Job(placement, np.asarray(sources), classes, requests))
        return len(self.jobs) - 1

    # ---- what is fitted ----------------------------------------------------------------------------------------
    def compare(self, topology: Topology, num_replicas: int, fit_modes=FIT_MODES, methods=METHODS) -> None:
        """``experiments.compare`` on the statistics: every method fitted every way."""
        fits = (fit(self.fit_data(mode), topology, method, np.ones(self.fit_data(mode).num_tokens, bool),
                    num_replicas, self.seed, cache=self.cache) for mode in fit_modes for method in methods)
        self._record(topology, num_replicas, fit_modes, methods, fits)

    def _record(self, topology: Topology, num_replicas: int, fit_modes, methods, fits) -> None:
        """Jobs for the (placement, sources) that ``fits`` yields, mode by mode and method by method."""
        for mode in fit_modes:
            jobs = {}
            for method in methods:
                placement, sources = next(fits)
                jobs[method] = self._job(placement, sources)
                if mode == "prefill":  # as experiments.compare(..., fitted=) records them
                    self.fitted[(str(topology), num_replicas, method)] = (placement, sources)
            self.pending.append(("compare", (topology, num_replicas, mode), jobs))

    def compare_many(self, tasks: list[tuple[Topology, int]], fit_modes=FIT_MODES, methods=METHODS,
                     processes: int = 1, say=None) -> None:
        """``compare`` for every (topology, num_replicas) of ``tasks``; with ``processes`` > 1 the fits run in
        that many worker processes (``minimoe.placement.parallel_fits``: the same placements, sooner)."""
        say = say or (lambda message: None)
        if processes == 1:
            for topology, num_replicas in tasks:
                say(f"placement and grouping: {topology} ({topology.num_gpus} GPUs), {num_replicas} slots per layer")
                self.compare(topology, num_replicas, fit_modes, methods)
            return
        from minimoe.placement.parallel_fits import fit_many

        work = [(topology, num_replicas, mode, method) for topology, num_replicas in tasks for mode in fit_modes
                for method in methods]
        say(f"placement and grouping: {len(work)} fits for {len(tasks)} topology and slot budget pairs on "
            f"{processes} processes")
        fitted = iter(fit_many({mode: self.fit_data(mode) for mode in fit_modes}, work, self.seed, processes))
        for topology, num_replicas in tasks:  # the jobs in the order compare() would make them
            self._record(topology, num_replicas, fit_modes, methods, fitted)

    def compare_partitioners(self, topology: Topology, num_replicas: int, partitioners) -> None:
        """``experiments.compare_partitioners`` on the statistics (fitted on prefill)."""
        data, jobs, seconds = self.fit_data("prefill"), {}, {}
        every = np.ones(data.num_tokens, bool)
        for method in ("contiguous", "eplb", *(f"locality[{p}]" for p in partitioners)):
            start = time.perf_counter()
            partitioner = method[len("locality["):-1] if method.startswith("locality[") else None
            jobs[method] = self._job(*fit(data, topology, "locality" if partitioner else method, every,
                                          num_replicas, self.seed, partitioner, self.cache))
            seconds[method] = time.perf_counter() - start
        self.pending.append(("partitioners", (topology, num_replicas, seconds), jobs))

    def drift(self, topology: Topology, fit_mix: dict, eval_mix: dict, num_replicas: int | None = None) -> None:
        """``experiments.drift`` on the statistics: the same requests drawn, the same fits."""
        stats, seed = self.stats, self.seed
        fit_requests, eval_requests = drift_requests(stats.domain, fit_mix, eval_mix, seed)
        history = FitData.of_stats(stats, "all", requests=fit_requests)
        newcomers = FitData.of_stats(stats, "prefill", requests=eval_requests)
        num_replicas = num_replicas or stats.num_experts
        random_sources = group(history, topology, "random", seed=seed)
        every = np.ones(history.num_tokens, bool)
        jobs = {}
        for method in ("contiguous", "eplb", "locality", "grouping+locality"):
            base = "locality" if method == "grouping+locality" else method
            placement = place(history, topology, base, tokens=every, num_replicas=num_replicas,
                              **(dict(sources=random_sources, cache=self.cache) if base == "locality" else {}))
            sources = random_sources
            if method == "grouping+locality":
                sources = group(newcomers, topology, "signature", seed=seed, placement=placement)
            jobs[method] = self._job(placement, sources, DECODE, eval_requests)
        self.pending.append(("drift", (topology,), jobs))

    # ---- what is measured --------------------------------------------------------------------------------------
    def unique_jobs(self) -> tuple[list[Job], np.ndarray]:
        """(distinct jobs, index of each job's distinct twin): identical fits are counted once."""
        keys, distinct, index = {}, [], []
        for job in self.jobs:
            key = job.key()
            if key not in keys:
                keys[key] = len(distinct)
                distinct.append(job)
            index.append(keys[key])
        return distinct, np.asarray(index, np.int64)

    def results(self, counts) -> dict:
        """Rows of every comparison from the pass-2 ``counts`` (one per job of ``self.jobs``)."""
        summary = [c.summary(self.hidden_size) for c in counts]
        out = dict(rows=[], partitioners=[], drift=[])
        for kind, spec, jobs in self.pending:
            reports = {method: summary[index] for method, index in jobs.items()}
            if kind == "compare":
                out["rows"] += _compare_rows(*spec, reports)
            elif kind == "partitioners":
                out["partitioners"] += _partitioner_rows(*spec, reports)
            else:
                out["drift"] += _drift_rows(reports)
        return out


def _compare_rows(topology, num_replicas, mode, reports) -> list[dict]:
    rows = []
    for method, report in reports.items():
        row = dict(topology=f"{topology.num_nodes}x{topology.gpus_per_node}", num_replicas=num_replicas, fit=mode,
                   method=method, inter_node_bytes=report["inter_node_bytes"],
                   pair_bytes_inter=report["pair_bytes_inter"], intra_node_bytes=report["intra_node_bytes"],
                   remote_nodes_per_token=report["remote_nodes_per_token"],
                   pair_node_local_fraction=report["pair_node_local_fraction"],
                   load_max_over_mean=report["load_max_over_mean"])
        for base in ("contiguous", "eplb"):
            if base in reports:
                row[f"cut_vs_{base}"] = cut(report["inter_node_bytes"], reports[base]["inter_node_bytes"])
                row[f"pair_cut_vs_{base}"] = cut(report["pair_bytes_inter"], reports[base]["pair_bytes_inter"])
        rows.append(row)
    return rows


def _partitioner_rows(topology, num_replicas, seconds, reports) -> list[dict]:
    return [dict(topology=f"{topology.num_nodes}x{topology.gpus_per_node}", num_replicas=num_replicas,
                 fit="prefill", method=method, inter_node_bytes=report["inter_node_bytes"],
                 load_max_over_mean=report["load_max_over_mean"], fit_seconds=seconds[method],
                 cut_vs_contiguous=cut(report["inter_node_bytes"], reports["contiguous"]["inter_node_bytes"]),
                 cut_vs_eplb=cut(report["inter_node_bytes"], reports["eplb"]["inter_node_bytes"]))
            for method, report in reports.items()]


def _drift_rows(reports) -> list[dict]:
    return [dict(method=method, inter_node_bytes=report["inter_node_bytes"],
                 cut_vs_contiguous=cut(report["inter_node_bytes"], reports["contiguous"]["inter_node_bytes"]),
                 cut_vs_eplb=cut(report["inter_node_bytes"], reports["eplb"]["inter_node_bytes"]),
                 load_max_over_mean=report["load_max_over_mean"])
            for method, report in reports.items()]
