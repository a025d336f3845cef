"""Fitting many placements at once in worker processes: the same placements as one after another, sooner.

The report fits every method, every way, for every topology and slot budget (``StreamedExperiments.compare``):
on the bundled trace 144 fits, 90% of the report's time, each a pure function of its inputs (the fitting data,
the topology, the method, the slot budget and the seed). So they can run in any order, in any process, and
give the same placements: ``fit_many`` hands them to a ``concurrent.futures`` pool of ``processes`` workers,
started with ``spawn`` (a forked copy of a process that already ran OpenMP or BLAS threads can deadlock), and
returns the results in the order of ``tasks``.

What it cannot share across processes is the partition cache (``minimoe.placement.locality``): a worker
recomputes a partition another worker already has. So the fits of one topology, fit mode and method, which differ
only in the slot budget and hand Mt-KaHyPar the same hypergraph, go to one worker together. The cache only skips
work whose result is known, so the placements are the same; ``tests/test_parallel_fits.py`` checks that against
fitting one after another.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from minimoe.placement.experiments import fit
from minimoe.placement.fitdata import FitData
from minimoe.placement.topology import Topology

AUTO_MIN_PAIRS = 32_768  # "auto": fit in processes only when a fitting set holds this many (token, expert) pairs

COST = {"grouping+locality": 3, "locality": 2, "grouping": 1}  # the methods' relative fitting time, roughly
_WORKER: dict = {}  # in each worker: the fitting data by mode, the seed, the node-partition cache


def auto_processes(fit_pairs: int, cores: int | None = None) -> int:
    """The ``fit_processes="auto"`` rule: every core up to 4, when the largest fitting set holds at least
    ``AUTO_MIN_PAIRS`` (token, expert) pairs per layer, tokens x top_k: a fit's time grows with the pins of its
    hypergraph, one hyperedge of top_k pins per token (16,384 tokens of a top-2 model, 4,096 of a top-8 one). Below
    that a whole report fits in seconds and starting workers costs more."""
    if cores is None:
        cores = os.cpu_count() or 1
    return max(1, min(4, cores)) if fit_pairs >= AUTO_MIN_PAIRS else 1


def _start(data: dict[str, FitData], seed: int) -> None:
    _WORKER.update(data=data, seed=seed, cache={})


def _fit(task: tuple[Topology, int, str, str]):
    topology, num_replicas, mode, method = task
    data = _WORKER["data"][mode]
    every = np.ones(data.num_tokens, bool)
    return fit(data, topology, method, every, num_replicas, _WORKER["seed"], cache=_WORKER["cache"])


def _fit_unit(tasks: list[tuple[Topology, int, str, str]]):
    return [_fit(task) for task in tasks]


def fit_many(data: dict[str, FitData], tasks: list[tuple[Topology, int, str, str]], seed: int,
             processes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(placement, sources) of every task ``(topology, num_replicas, fit mode, method)``, in the order of
    ``tasks``, fitted on ``data[fit mode]`` with ``seed`` by ``processes`` worker processes (1: in this one).
    Raises ValueError for ``processes < 1``."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an int >= 1, got {processes!r}")
    if processes == 1 or len(tasks) < 2:
        _start(data, seed)
        try:
            return [_fit(task) for task in tasks]
        finally:
            _WORKER.clear()
    units: dict = {}  # (topology, fit mode, method) -> task indices: every slot budget of it, in one worker
    for i, (topology, _, mode, method) in enumerate(tasks):
        units.setdefault((str(topology), mode, method), []).append(i)
    # the slowest units first, so no worker is left with a long one at the end
    order = sorted(units.values(), key=lambda unit: (-COST.get(tasks[unit[0]][3], 0) * len(unit),
                                                     -tasks[unit[0]][0].num_gpus, unit[0]))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(processes, len(order)), mp_context=context, initializer=_start,
                             initargs=(data, seed)) as pool:
        done = list(pool.map(_fit_unit, [[tasks[i] for i in unit] for unit in order], chunksize=1))
    out = [None] * len(tasks)
    for unit, results in zip(order, done):
        for i, result in zip(unit, results):
            out[i] = result
    return out
