"""Run a function on several processes joined in one gloo process group, and collect what each returned.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes; each joins a gloo group (rendezvous
through a temporary file) with a collective timeout of ``timeout_s``, calls ``fn(rank, world_size, *args)``
and reports back. It returns one dict per rank: ``status`` ("ok", "error" or "exited" when the process
ended without reporting), ``value`` (the return value or the traceback text), ``exitcode`` and ``seconds``
(from the start of ``fn`` to the report). Processes still alive after ``deadline_s`` are killed, so a test
can never hang. ``fn`` must be importable (a module-level function).

Starting processes is the slow part (each imports torch), so ``fn`` may be a list of phases run one after
the other in the same processes; then the result is one such list of dicts per phase. A rank whose phase
raises reports the error and runs no further phase (its process ends, as a failed rank's would).
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import tempfile
import time
import traceback


def _worker(phases, rank, world_size, init_file, timeout_s, args, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from minimoe.parallel import destroy_process_group, init_process_group

    try:
        init_process_group("gloo", timeout_s, f"file://{init_file}", rank, world_size)
        for phase, fn in enumerate(phases):
            start = time.monotonic()
            try:
                value = fn(rank, world_size, *args)
            except BaseException:  # report everything, including SystemExit, to the test
                results.put(((phase, rank), "error", traceback.format_exc(), time.monotonic() - start))
                return
            results.put(((phase, rank), "ok", value, time.monotonic() - start))
    finally:
        destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout_s: float = 30.0, deadline_s: float = 240.0):
    phases = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    outcome: dict[tuple, tuple] = {}
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "rendezvous")
        processes = [context.Process(target=_worker, daemon=True,
                                     args=(phases, rank, world_size, init_file, timeout_s, args, results))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        end = time.monotonic() + deadline_s
        while len(outcome) < world_size * len(phases) and time.monotonic() < end:
            try:
                key, status, value, seconds = results.get(timeout=0.2)  # key = (phase, rank)
                outcome[key] = (status, value, seconds)
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and results.empty():
                    break
        for process in processes:
            process.join(timeout=max(0.1, min(10.0, end - time.monotonic())))
            if process.is_alive():
                process.kill()
                process.join()
    missing = ("exited", None, None)
    per_phase = [[dict(zip(("status", "value", "seconds"), outcome.get((phase, rank), missing)),
                       exitcode=process.exitcode) for rank, process in enumerate(processes)]
                 for phase in range(len(phases))]
    return per_phase if isinstance(fn, (list, tuple)) else per_phase[0]


def values(outcomes: list[dict]) -> list:
    """The return values of every rank, or an AssertionError carrying each failed rank's traceback."""
    failed = [f"rank {rank}: {o['status']} (exit code {o['exitcode']})\n{o['value']}"
              for rank, o in enumerate(outcomes) if o["status"] != "ok"]
    assert not failed, "\n".join(failed)
    return [o["value"] for o in outcomes]
