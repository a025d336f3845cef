"""Where the two passes run: in this process, or on Dask workers (a local cluster or an existing one).

Both passes are a map over parts of the trace and a merge by addition: pass 1 maps ``stats_part`` (the
statistics of ``minimoe.traces.stats``) and merges with ``TraceStats.merge``; pass 2 maps ``counts_part``
(the traffic counts of ``minimoe.placement.evaluate``) and adds them. The same two functions run

* in-process (``LocalEngine``): over an in-memory trace (batches of rows) or a Parquet file (its row groups,
  read one batch at a time);
* on Dask (``DaskEngine``; Rocklin, "Dask: Parallel Computation with Blocked algorithms and Task
  Scheduling", SciPy 2015): one task per group of Parquet row groups, each worker reading its rows from
  the file itself (on a cluster the path must be readable by every worker), results merged on the client.
  ``--workers N`` starts a ``LocalCluster`` of N single-threaded worker processes; ``--scheduler ADDRESS``
  connects to a running scheduler.

Merging is addition of integers and a union of bottom-k samples keyed by a hash of the row, so every engine
and every split gives the same statistics and the same counts (tests/test_streaming.py). Which tokens are fitted
on and which measured (``minimoe.placement.splits``) is decided once, before pass 1 (``minimoe.placement.splits.choose_split``:
for a Parquet file from one read of its request, phase and step columns), and applied to every batch as a
``minimoe.traces.stats.ClassRule``.
"""
from __future__ import annotations

import os

import numpy as np

from minimoe.placement.evaluate import Counts, Job, _Tables, count_jobs
from minimoe.traces.batches import batches_of
from minimoe.traces.format import Trace
from minimoe.traces.parquet import ParquetTrace
from minimoe.traces.stats import ClassRule, TraceStats, as_rule

CONNECT_TIMEOUT_S = 30
NO_WORKERS_S = 120  # a pass waiting this long with no worker connected stops with an error
POLL_S = 5  # how often a waiting pass checks that some worker is still connected


def _batches(source, unit, check: bool):
    """Batches of one unit of work: rows (start, stop) of an in-memory trace, or row groups of a file."""
    if isinstance(source, Trace):
        start, stop = unit
        for batch in batches_of(source, 1 << 18):
            if start <= batch.start < stop:
                yield batch
        return
    yield from source.batches(unit, check=check)


def _open(source):
    return ParquetTrace(source) if isinstance(source, (str, os.PathLike)) else source


def stats_part(source, unit, rule: ClassRule, sample_size: int, seed: int) -> TraceStats:
    """Pass 1 over one unit (rows of a Trace, or row groups of a Parquet file named by its path)."""
    source = _open(source)
    stats = TraceStats.empty(source.num_experts, source.top_k, source.num_layers, source.model, rule,
                             sample_size, seed, source.has_domain)
    for batch in _batches(source, unit, check=True):
        stats.add(batch)
    if isinstance(source, ParquetTrace):
        stats.runs = list(source.runs)
    return stats


def counts_part(source, unit, rule: ClassRule | int, jobs: list[Job]) -> list[Counts]:
    """Pass 2 over one unit: every job's counts."""
    source, rule = _open(source), as_rule(rule)
    tables = [_Tables(job.placement) for job in jobs]
    total = [Counts(job.placement.num_layers, job.placement.num_gpus) for job in jobs]
    for batch in _batches(source, unit, check=False):
        parts = count_jobs(batch, rule.classes(batch), jobs, tables)
        total = [a + b for a, b in zip(total, parts)]
    return total


def _add_counts(a, b):
    return [x + y for x, y in zip(a, b)]


class LocalEngine:
    """Runs every unit in this process, one after the other."""

    name = "in-process"

    def units(self, source) -> list:
        if isinstance(source, Trace):
            return [(0, source.num_tokens)]
        return [list(range(source.num_row_groups))]

    def pass_one(self, source, rule, sample_size, seed) -> TraceStats:
        stats = None
        for unit in self.units(source):
            part = stats_part(source, unit, rule, sample_size, seed)
            stats = part if stats is None else stats.merge(part)
        return stats

    def pass_two(self, source, rule, jobs) -> list[Counts]:
        total = None
        for unit in self.units(source):
            part = counts_part(source, unit, rule, jobs)
            total = part if total is None else _add_counts(total, part)
        return total

    def close(self):
        pass


def _connect(client_class, scheduler: str):
    """A Dask ``Client`` of the scheduler at ``scheduler`` that has at least one worker. Raises OSError naming
    ``--scheduler`` when nothing answers as a Dask scheduler within ``CONNECT_TIMEOUT_S`` seconds (a wrong port,
    such as the dashboard's, can accept the connection and never answer), or when no worker joins it in as long."""
    import gc
    import socket
    import threading
    from urllib.parse import urlsplit

    hint = ("start one with `dask scheduler` and pass the address it prints (port 8786 by default, not the "
            "dashboard's)")
    if scheduler.startswith("tcp://"):  # a refused connection fails at once instead of after Dask's timeout
        address = urlsplit(scheduler)
        try:
            socket.create_connection((address.hostname, address.port), timeout=CONNECT_TIMEOUT_S).close()
        except ConnectionRefusedError:
            raise OSError(f"--scheduler {scheduler}: no Dask scheduler answered there (connection refused: nothing "
                          f"listens on that port); {hint}") from None
        except (OSError, ValueError):  # unreachable, slow or malformed: Dask's own attempt below says so
            pass
    outcome = {}

    def connect():  # in a daemon thread: a handshake that never completes must not keep the process alive
        try:
            outcome["client"] = client_class(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except BaseException as error:  # noqa: BLE001 - any failure to connect is reported the same way
            outcome["error"] = error

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S + 5)
    if "client" not in outcome:
        error = outcome.pop("error", None)
        cause = f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})" if error else ""
        if isinstance(error, MemoryError):  # Dask read another protocol's bytes as the length of a huge message
            cause = " (something answered there, but not in Dask's protocol)"
        # A client whose constructor failed (reachable from the error's traceback) is collected whenever the garbage
        # collector runs next, and its __del__ stops its event loop: collect it now, not in the middle of starting
        # another cluster's loop, where that stop waits on a lock the start holds.
        error = None
        gc.collect()
        raise OSError(f"--scheduler {scheduler}: no Dask scheduler answered there within {CONNECT_TIMEOUT_S} s"
                      f"{cause}; {hint}")
    client = outcome["client"]
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except (TimeoutError, OSError) as error:
        client.close()
        raise OSError(f"--scheduler {scheduler}: the scheduler has no workers (none joined within "
                      f"{CONNECT_TIMEOUT_S} s); start one with `dask worker {scheduler} --nthreads 1`") from error
    return client


class DaskEngine:
    """Runs the units as Dask tasks: on ``LocalCluster(n_workers=workers)`` or on the scheduler at
    ``scheduler`` (e.g. ``tcp://10.0.0.1:8786``). Raises ImportError (how to install) without dask, and
    OSError naming the address when no scheduler answers within ``CONNECT_TIMEOUT_S`` seconds or none of its
    workers joins in as long; a pass raises OSError when every worker has been gone for ``NO_WORKERS_S`` seconds."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None, groups_per_task: int = 1):
        try:
            import logging

            from dask.distributed import Client, LocalCluster
        except ImportError as error:
            raise ImportError("--workers/--scheduler need Dask: pip install 'dask[distributed]' (or "
                              "pip install 'minimoe[dask]')") from error
        self.groups_per_task = groups_per_task
        if scheduler is not None:
            self.client = _connect(Client, scheduler)
            self.cluster, self.name = None, f"Dask scheduler {scheduler}"
        else:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.CRITICAL)
            self.client = Client(self.cluster)
            self.name = f"Dask LocalCluster, {workers} workers"

    def units(self, source) -> list:
        if isinstance(source, Trace):
            raise ValueError("Dask workers read the trace from its file: give a Parquet trace (--trace FILE.parquet)")
        groups = list(range(source.num_row_groups))
        return [groups[i:i + self.groups_per_task] for i in range(0, len(groups), self.groups_per_task)]

    def _map(self, function, source, merge, **constants):
        """Map ``function`` over the units on the workers and merge the results as they arrive (addition: any
        order will do). Raises OSError when no worker has been connected for ``NO_WORKERS_S`` seconds while
        tasks wait (Dask itself would wait for new workers forever), or when the scheduler stops answering."""
        from dask.distributed import wait

        path, units = os.path.abspath(source.path), self.units(source)
        pending = set(self.client.map(function, [path] * len(units), units, pure=False, **constants))
        result, alone_since = None, None
        while pending:
            try:
                done, pending = wait(pending, timeout=POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for future in done:
                part = future.result()  # a task's error is raised here, as it was raised on the worker
                result = part if result is None else merge(result, part)
            alone_since = None if done else self._check_workers(alone_since, pending)
        return result

    def _check_workers(self, alone_since: float | None, pending) -> float | None:
        """The time since which no worker has been connected (None: some are), raising OSError past
        ``NO_WORKERS_S`` or when the scheduler does not answer."""
        import time

        try:
            workers = len(self.client.nthreads())
        except (OSError, TimeoutError) as error:
            raise OSError(f"{self.name}: the scheduler stopped answering ({type(error).__name__})") from error
        if workers:
            return None
        now = time.monotonic()
        if alone_since is None:
            return now
        if now - alone_since >= NO_WORKERS_S:
            self.client.cancel(list(pending))
            raise OSError(f"{self.name}: no worker has been connected for {NO_WORKERS_S} s while {len(pending)} "
                          f"tasks wait (did the workers run out of memory or get stopped?)")
        return alone_since

    def pass_one(self, source, rule, sample_size, seed) -> TraceStats:
        return self._map(stats_part, source, TraceStats.merge, rule=rule, sample_size=sample_size, seed=seed)

    def pass_two(self, source, rule, jobs) -> list[Counts]:
        scattered = self.client.scatter(jobs, broadcast=True)
        return self._map(counts_part, source, _add_counts, rule=rule, jobs=scattered)

    def close(self):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def run_passes(source, engine, rule: ClassRule | int, sample_size: int, seed: int = 0) -> TraceStats:
    """Pass 1 with the file-level checks: the rows read by every part cover the file once, in order, and every
    MoE layer holds an expert id (ValueError naming the file, as ``Trace.load``'s callers do for .npz). ``rule``:
    a ClassRule, or the online window of the phase rule."""
    stats = engine.pass_one(source, as_rule(rule), sample_size, seed).finish()
    if isinstance(source, ParquetTrace) and source.num_tokens:
        source.check_runs(stats.runs)
        empty = np.flatnonzero(stats.counts.sum(axis=(0, 1, 3), dtype=np.int64) == 0)  # (L,) -> layers with no id
        if empty.size:
            raise ValueError(f"trace file {source.label}: MoE layer {int(empty[0])} holds no expert id (all -1): a "
                             "dense layer, or a layer the capture never wrote")
    return stats
