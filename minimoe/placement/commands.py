"""The ``minimoe report`` and ``minimoe findings`` commands (wired by ``minimoe.cli``).

``report`` is the main job. ``findings`` prints the paper's three observations on a trace, each beside its
baseline (``minimoe.traces.findings``; a Parquet trace in one pass of ``minimoe.placement.engine``). Both read
``--trace FILE`` or record the bundled model (``load_or_record``).

The report: a trace -> the three findings with their baselines, every placement and grouping method fitted and
measured on each topology (``minimoe.placement.report.run_report``), and report.txt / report.json / report.html
plus the deployable placement files in ``--out``. A load-only trace gets what counts alone can decide
(``minimoe.placement.load_report``).
"""

from __future__ import annotations

import re
from pathlib import Path

from minimoe.arguments import (DEFAULT_TOPOLOGIES, check_input_file, check_moe_model_dir, check_output_file,
                               output_dir, progress)
from minimoe.placement.topology import Topology


RECORDING_FLAGS = ("--requests-per-domain", "--new-tokens", "--temperature")  # they describe a recording
PER_TOKEN_FLAGS = ("--window", "--hidden-size", "--max-fit-tokens", "--fit-processes", "--compare-partitioners")


def refuse_unused(args, flags, why: str) -> None:
    """Raise ValueError naming the ``flags`` the user gave (``args.given``, the options on the command line) that
    this run would ignore, and ``why``."""
    unused = [flag for flag in flags if flag in getattr(args, "given", ())]
    if unused:
        one = len(unused) == 1
        raise ValueError(f"{', '.join(unused)} {'does' if one else 'do'} not apply {why}: drop {'it' if one else 'them'}")


def check_source_model(args) -> None:
    """Without --trace, the run folder to record (--model, default: the bundled one) must be a minimoe MoE run
    with its train_config.json (``minimoe.traces.workload.check_run``); raises ValueError naming --model. With
    --trace, the flags that describe a recording are refused (the trace is read as recorded)."""
    if args.trace:
        refuse_unused(args, RECORDING_FLAGS, f"with --trace {args.trace}, a trace recorded already (they describe a "
                                             "recording)")
    else:
        from minimoe.traces.workload import BUNDLED_MODEL, check_run

        check_run("--model", args.model or BUNDLED_MODEL)


def load_or_record(args, say=progress):
    """The trace a findings/report run works on: ``--trace FILE`` (a per-token or a load-only trace; a .parquet
    file is opened and read later in batches) or a recording of ``--model``."""
    from minimoe.traces.loads import read_trace_file
    from minimoe.traces.parquet import ParquetTrace, is_parquet

    if args.trace and is_parquet(args.trace):
        trace = ParquetTrace(args.trace)
        if trace.num_tokens == 0:
            raise ValueError(f"--trace {args.trace}: the trace is empty (no tokens)")
        return trace
    if args.trace:
        return read_trace_file(args.trace)
    from minimoe.traces.workload import BUNDLED_MODEL, bundled_trace

    say(f"recording {4 * args.requests_per_domain} requests of the four domains ({args.new_tokens} decode "
        f"tokens each)")
    return bundled_trace(num_per_domain=args.requests_per_domain, max_new_tokens=args.new_tokens, seed=args.seed,
                         model_dir=args.model or BUNDLED_MODEL, temperature=args.temperature, progress=True)


def findings_command(args) -> int:
    import json

    from minimoe.traces.findings import findings
    from minimoe.traces.findings_table import format_findings
    from minimoe.traces.format import Trace

    check_input_file("--trace", args.trace)
    if args.save_trace and args.trace:
        raise ValueError(f"--save-trace {args.save_trace}: --trace {args.trace} is a saved trace already; "
                         "--save-trace saves a recording (of --model or the bundled model)")
    check_source_model(args)
    out = check_output_file("--out", args.out, ".json") if args.out else None
    save = check_output_file("--save-trace", args.save_trace, ".npz") if args.save_trace else None
    trace = load_or_record(args)
    from minimoe.traces.loads import LoadTrace

    if isinstance(trace, LoadTrace):
        raise ValueError(f"--trace {args.trace}: a load trace (counts per expert only): the findings need per-token "
                         "routing; minimoe report --trace on it shows what counts support")
    if save:
        from minimoe.traces.parquet_writer import save_trace

        save_trace(trace if isinstance(trace, Trace) else trace.read(), save)
    progress("findings: imbalance, domain specificity, prefill -> decode")
    if isinstance(trace, Trace):
        result = findings(trace, seed=args.seed)
    else:  # a Parquet file: one pass over its batches
        from minimoe.placement.engine import LocalEngine, run_passes
        from minimoe.traces.findings import findings_of_stats

        result = findings_of_stats(run_passes(trace, LocalEngine(), 0, 1, args.seed), seed=args.seed,
                                   layer_ids=trace.layer_ids)
    print(format_findings(result))
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    written = [str(path) for path in (out, save) if path]
    if written:
        print(f"\nwrote {', '.join(written)}")
    return 0


def suggested_topology(num_experts: int) -> str | None:
    """A small cluster of at least 2 nodes whose GPUs hold ``num_experts`` evenly: the smallest divisor of the
    expert count as nodes, the smallest divisor of the rest as GPUs per node (1 if none); None for 1 expert."""
    def smallest_divisor(n: int) -> int | None:
        return next((d for d in range(2, n + 1) if n % d == 0), None)

    nodes = smallest_divisor(num_experts)
    if nodes is None:
        return None
    return f"{nodes}x{smallest_divisor(num_experts // nodes) or 1}"


def fitting_topologies(args, num_experts: int, check, say=None) -> list:
    """The topologies to compare: those the user named (all must fit ``num_experts``), else the defaults that
    fit (a model with 60 experts cannot fill 8 GPUs evenly; the ones skipped are said)."""
    if args.topologies is not None:
        try:
            check(args.topologies, num_experts)
        except ValueError as error:
            raise ValueError(f"--topologies: {error}") from None
        return args.topologies
    defaults = [Topology.parse(part) for part in DEFAULT_TOPOLOGIES.split(",")]
    kept = [t for t in defaults if not t.fits(num_experts)]
    if not kept:
        example = suggested_topology(num_experts)
        raise ValueError(f"--topologies: none of the defaults {DEFAULT_TOPOLOGIES} holds {num_experts} experts evenly; "
                         "name clusters whose GPU count divides the expert count"
                         + (f", e.g. --topologies {example}" if example else ""))
    if say and len(kept) < len(defaults):
        say(f"skipping {', '.join(str(t) for t in defaults if t not in kept)}: their GPUs cannot hold "
            f"{num_experts} experts evenly (name clusters with --topologies)")
    return kept


def report_command(args) -> int:
    from minimoe.traces.parquet import is_parquet

    check_input_file("--trace", args.trace)
    check_source_model(args)
    if (args.workers or args.scheduler) and not (args.trace and is_parquet(args.trace)):
        flag = "--workers" if args.workers else "--scheduler"
        raise ValueError(f"{flag}: Dask workers read the trace from a Parquet file; give --trace FILE.parquet "
                         f"(minimoe import trace.npz --out trace.parquet converts one)")
    with output_dir("--out", args.out) as out:
        return _report_into(args, out)


PLACEMENT_FILE = re.compile(r"placement-\d+x\d+(-placement-only)?\.json")  # the names the report writes


def _a_report_placement(path: Path) -> bool:
    """Whether ``path`` holds what a report writes there: a deployment or placement file of minimoe (by its format
    tag), not a file of the user's that happens to have the name."""
    import json

    from minimoe.placement.deployment import FORMAT
    from minimoe.placement.phy2log import FORMAT as PLACEMENT_FORMAT

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") in (FORMAT, PLACEMENT_FORMAT)


def remove_stale_placements(out: Path, written) -> None:
    """Remove the placement files (``PLACEMENT_FILE``, with minimoe's format tag) an earlier report left in
    ``out`` that this run did not write, so that none of them can be deployed as this report's; says which were
    removed, and which files of those names it left because minimoe did not write them."""
    named = sorted(p.name for p in out.iterdir() if PLACEMENT_FILE.fullmatch(p.name) and p.name not in written)
    stale = [name for name in named if _a_report_placement(out / name)]
    for name in stale:
        (out / name).unlink()
    if stale:
        print(f"removed {', '.join(stale)} from {out}: an earlier report's placements, not measured by this one")
    others = [name for name in named if name not in stale]
    if others:
        print(f"left {', '.join(others)} in {out}: not placement files of minimoe (no minimoe format tag), not "
              "measured by this report")


def _engine(args):
    """Where the report's two passes run: this process, a local Dask cluster, or a running one."""
    from minimoe.placement.engine import DaskEngine, LocalEngine

    if args.workers or args.scheduler:
        return DaskEngine(workers=args.workers, scheduler=args.scheduler)
    return LocalEngine()


def _report_into(args, out: Path) -> int:
    import json
    import time

    from minimoe.placement.report import Stopwatch, check_topologies, json_ready, run_report, save_decision
    from minimoe.placement.report_text import format_report
    from minimoe.placement.report_html import write_html, write_text_html

    if not args.trace:  # check what can be checked before recording for minutes
        from minimoe.traces.workload import BUNDLED_MODEL

        num_experts = check_moe_model_dir("--model", str(args.model or BUNDLED_MODEL))
        fitting_topologies(args, num_experts, check_topologies)
        if args.new_tokens < 2:
            raise ValueError(f"--new-tokens {args.new_tokens}: the report fits on the first decode tokens of each "
                             "request and measures the ones after them: record at least 2")
        if args.window is not None and args.window >= args.new_tokens:
            raise ValueError(f"--window {args.window} must be smaller than --new-tokens {args.new_tokens}: the "
                             f"decode tokens after the window are the held-out set")
    started, stopwatch = time.perf_counter(), Stopwatch(progress)
    trace = load_or_record(args, stopwatch)
    args.topologies = fitting_topologies(args, trace.num_experts, check_topologies, stopwatch)
    from minimoe.traces.loads import LoadTrace

    if isinstance(trace, LoadTrace):  # a load trace: what counts alone can decide
        refuse_unused(args, PER_TOKEN_FLAGS, f"to --trace {args.trace}, a load trace (counts per expert: no tokens "
                                             "to fit on or measure)")
        from minimoe.placement.load_report import format_load_report, run_load_report, save_load_decision

        result = run_load_report(trace, args.topologies, seed=args.seed, progress=stopwatch)
        placements = save_load_decision(trace, result, args.topologies, out, seed=args.seed)
        text = format_load_report(result, str(out))
        print(text)
        (out / "report.txt").write_text(text + "\n")
        (out / "report.json").write_text(json.dumps(json_ready(result), indent=1) + "\n")
        write_text_html(out / "report.html", "minimoe report (load counts)", text)
        remove_stale_placements(out, placements)
        names = ("report.html", "report.txt", "report.json", *placements)
        print(f"\nwrote {', '.join(str(out / n) for n in names)} in {time.perf_counter() - started:.0f} s")
        return 0
    fitted = {}  # the placements fitted on prefill, so the recommended ones are saved without refitting
    engine = _engine(args)
    try:
        result = run_report(trace, args.topologies, window=args.window, seed=args.seed,
                            hidden_size=args.hidden_size, progress=stopwatch, fitted=fitted,
                            max_fit_tokens=args.max_fit_tokens, engine=engine,
                            compare_partitioners=args.compare_partitioners, fit_processes=args.fit_processes)
    except ValueError as error:
        if "online window" in str(error):
            raise ValueError(f"--window {args.window}: {error}") from None
        raise
    finally:
        engine.close()
    placements = save_decision(trace, result, args.topologies, out, seed=args.seed, fitted=fitted)
    text = format_report(result, str(out))
    print(text)
    if not args.trace:
        trace.save(out / "trace.npz")
    (out / "report.txt").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps(json_ready(result), indent=1) + "\n")
    write_html(out / "report.html", result, text)
    remove_stale_placements(out, placements)
    written = ", ".join(str(out / name) for name in ("report.html", "report.txt", "report.json", *placements)
                        + (() if args.trace else ("trace.npz",)))
    print(f"\nwrote {written} in {time.perf_counter() - started:.0f} s")
    return 0
