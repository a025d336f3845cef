"""How `minimoe report --trace` grows with the trace: synthetic Parquet traces of 1M, 10M, 100M tokens.

Run (from the repository root, on a quiet machine):

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_scale.py --sizes 1M,10M [--dir /tmp/minimoe-scale]
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_scale.py --sizes 100M [--dir ...]

Each trace (64 experts, top-8, 4 MoE layers, 4 domains; requests of 256-1024 prefill and 64-256 decode tokens;
``minimoe.traces.synthetic.synthetic_chunks``) is generated and written to Parquet chunk by chunk, never whole
in memory, then kept in ``--dir`` for the next run. The report runs as its own process, exactly as a user runs it:

    python -m minimoe report --trace FILE --topologies 4x2 --threads 1 --out DIR [--workers N]

and this script records its wall time, CPU time and peak resident memory (``os.wait4``: the kernel's own
high-water mark of the process, or the largest sum of its RSS and its worker processes' (the fit processes, and
with ``--workers`` the Dask workers) sampled every 0.2 s, whichever is larger), the time of each step from the
report's progress lines, and the time per token. Results are added to benchmarks/results/scale.json (one entry per
size, replacing an older one) and benchmarks/results/scale.md is rewritten from it.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = dict(num_layers=4, num_experts=64, top_k=8, num_domains=4)
TARGETS = {10_000_000: (180, 2.0), 100_000_000: (1800, 4.0)}  # seconds, GB


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmM]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"a size is a number with an optional k or M suffix, got {text!r}")
    return int(match[1]) * {"": 1, "k": 1000, "m": 1_000_000}[match[2].lower()]


def label(size: int) -> str:
    return f"{size // 1_000_000}M" if size % 1_000_000 == 0 else f"{size // 1000}k"


def generate(path: Path, size: int) -> float:
    """Write a synthetic trace of ``size`` tokens to ``path`` chunk by chunk; returns the seconds it took."""
    from minimoe.traces.parquet_writer import ParquetTraceWriter
    from minimoe.traces.synthetic import synthetic_chunks

    start = time.perf_counter()
    partial = path.with_suffix(".partial.parquet")
    with ParquetTraceWriter(partial, SHAPE["num_experts"], SHAPE["top_k"], SHAPE["num_layers"], model="synthetic",
                            has_domain=True) as writer:
        for chunk in synthetic_chunks(size, seed=0, **SHAPE):
            writer.append(chunk)
    partial.rename(path)
    return time.perf_counter() - start


def _tree_peak(pid: int, stop: threading.Event, out: dict) -> None:
    """Largest summed RSS of process ``pid`` and all its descendants at one moment (the fit processes, the Dask
    workers), sampled every 0.2 s."""
    import psutil

    try:
        parent = psutil.Process(pid)
        while not stop.is_set():
            total = 0
            for process in [parent, *parent.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            out["tree"] = max(out.get("tree", 0), total)
            stop.wait(0.2)
    except psutil.Error:
        pass


def run_measured(path: Path, out: Path, workers: int | None) -> dict:
    """Run the report on ``path`` as a child process: its wall time, its own CPU time and peak RSS
    (``os.wait4``), and the steps of its progress lines."""
    command = [sys.executable, "-m", "minimoe", "report", "--trace", str(path), "--topologies", "4x2",
               "--threads", "1", "--out", str(out)] + (["--workers", str(workers)] if workers else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    err_path = out.with_suffix(".stderr.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(err_path, "w") as err, open(out.with_suffix(".stdout.txt"), "w") as std:
        process = subprocess.Popen(command, stdout=std, stderr=err, env=env)
        peaks, stop = {}, threading.Event()
        sampler = threading.Thread(target=_tree_peak, args=(process.pid, stop, peaks), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        stop.set()
    stderr = err_path.read_text()
    if status != 0:
        raise SystemExit(f"the report failed (status {status}):\n{stderr[-3000:]}")
    steps = [(float(t), message) for t, message in re.findall(r"\[\s*(\d+) s\] (.*)", stderr)]
    return dict(command=" ".join(["python"] + command[1:]), wall_seconds=round(seconds, 1),
                cpu_seconds=round(usage.ru_utime + usage.ru_stime, 1),
                peak_rss_gb=round(max(usage.ru_maxrss * 1024, peaks.get("tree", 0)) / 1e9, 3),
                main_process_peak_rss_gb=round(usage.ru_maxrss * 1024 / 1e9, 3),
                steps=[dict(at_seconds=t, step=m) for t, m in steps])


def commit() -> str | None:
    """The repository's commit (short hash), or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> dict:
    import numpy
    import pyarrow

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(), numpy=numpy.__version__,
                pyarrow=pyarrow.__version__, memory_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                               / 1e9, 1))


def write_markdown(entries: list[dict]) -> str:
    lines = ["# `minimoe report --trace` on synthetic Parquet traces: cost by size", "",
             "64 experts, top-8, 4 MoE layers, 4 domains; requests of 256-1024 prefill + 64-256 decode tokens; one "
             "topology (4x2: the two slot budgets 64 and 72, every method fitted three ways: 36 placements measured "
             "on every held-out token; the drift test, which needs the bundled workload's named domains, is skipped). "
             "Generated and written chunk by chunk by "
             "`benchmarks/bench_scale.py`; the report runs as its own process (command below), reading the "
             "Parquet file twice in batches. Peak RSS: the larger of the kernel's high-water mark of that process and the "
             "largest sum, sampled every 0.2 s, of its RSS and its worker processes' (the fit processes; the Dask "
             "workers with `--workers`).", "",
             "| tokens | requests | file | wall | CPU | peak RSS | µs per token | pass 1 | findings + fits | pass 2 + "
             "output | passes, µs per token | target |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for e in sorted(entries, key=lambda e: (e["tokens"], e.get("workers") or 0)):
        target = TARGETS.get(e["tokens"])
        verdict = "" if not target else (
            f"≤ {target[0] / 60:.0f} min, ≤ {target[1]:.0f} GB: "
            f"{'met' if e['wall_seconds'] <= target[0] and e['peak_rss_gb'] <= target[1] else 'missed'}")
        pass_one, fits, pass_two = phases(e)
        workers = f" ({e['workers']} Dask workers)" if e.get("workers") else ""
        lines.append(f"| {label(e['tokens'])}{workers} | {e['requests']:,} | {e['file_gb']:.2f} GB | "
                     f"{e['wall_seconds']:.0f} s | {e['cpu_seconds']:.0f} s | {e['peak_rss_gb']:.2f} GB | "
                     f"{e['wall_seconds'] / e['tokens'] * 1e6:.1f} | {pass_one:.0f} s | {fits:.0f} s | "
                     f"{pass_two:.0f} s | {(pass_one + pass_two) / e['tokens'] * 1e6:.1f} | {verdict} |")
    single = {e["tokens"]: e for e in entries if not e.get("workers")}
    if len(single) >= 2:
        small, large = min(single), max(single)
        ratio = (single[large]["wall_seconds"] / large) / (single[small]["wall_seconds"] / small)
        passes = [(sum(phases(single[n])) - phases(single[n])[1]) / n for n in (small, large)]
        lines += ["", f"Time per token, {label(large)} vs {label(small)}: {ratio:.2f}x in all (flat within 25% "
                      f"means 0.80-1.25); the two passes over the trace alone: {passes[1] / passes[0]:.2f}x.",
                  "", "The findings and fits took " + ", ".join(f"{phases(single[n])[1]:.0f} s at {label(n)}"
                                                             for n in sorted(single)) +
                  ": far slower growth than the trace's, since each fit sees a sample of at most 8,192 tokens "
                  "per fitting set (65,536 (token, expert) pairs at top-8). At 1M tokens this nearly fixed "
                  "cost dominates, which is why the time per token falls with size instead of staying flat."]
        sizes = sorted(single)
        if len(sizes) >= 3:  # the cost of one more token: the fixed part cancels between two sizes
            steps = [(a, b, (single[b]["wall_seconds"] - single[a]["wall_seconds"]) / (b - a) * 1e6)
                     for a, b in zip(sizes, sizes[1:])]
            lines += ["", "Marginal time per token (the difference in wall time between two sizes over the difference "
                          "in tokens, so the fixed part cancels): " +
                      "; ".join(f"{label(a)} to {label(b)}: {us:.1f} µs" for a, b, us in steps) +
                      f". Last over first: {steps[-1][2] / steps[0][2]:.2f}x."]
    lines += ["", "Commands and machines:", ""]
    for e in sorted(entries, key=lambda e: e["tokens"]):
        lines.append(f"- {label(e['tokens'])}: `{e['command']}` on {e['machine']['cpu']}, {e['machine']['cores']} "
                     f"cores, {e['machine']['memory_gb']} GB, Python {e['machine']['python']}, numpy "
                     f"{e['machine']['numpy']}, pyarrow {e['machine']['pyarrow']}; trace generated in "
                     f"{e['generate_seconds']:.0f} s ({e['date']}{', commit ' + e['commit'] if e.get('commit') else ''})")
    return "\n".join(lines) + "\n"


def phases(entry: dict) -> tuple[float, float, float]:
    """Seconds of pass 1, of the findings and fits, and of pass 2 with writing the output, from the progress lines."""
    at = {s["step"].split(" ")[0] + ("2" if "pass 2" in s["step"] else ""): s["at_seconds"] for s in entry["steps"]}
    findings, second = at.get("findings:", 0.0), at.get("pass2", entry["wall_seconds"])
    return findings, second - findings, entry["wall_seconds"] - second


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,10M", type=lambda t: [parse_size(s) for s in t.split(",")],
                        help="comma-separated token counts, e.g. 1M,10M,100M (default: 1M,10M)")
    parser.add_argument("--dir", default="/tmp/minimoe-scale", help="where the Parquet traces are kept")
    parser.add_argument("--workers", type=int, default=None, help="run the report on N local Dask workers")
    parser.add_argument("--results", default=str(RESULTS / "scale"), help="results path without suffix")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    store = Path(args.results).with_suffix(".json")
    entries = json.loads(store.read_text()) if store.exists() else []
    from minimoe.traces.parquet import ParquetTrace

    for size in args.sizes:
        path = folder / f"synthetic_{label(size)}.parquet"
        generated = 0.0
        if not path.exists():
            print(f"generating {path} ({size:,} tokens)", flush=True)
            generated = generate(path, size)
        trace = ParquetTrace(path)
        requests = trace.column_max("request") + 1
        print(f"report on {path} ({size:,} tokens, {requests:,} requests)", flush=True)
        run = run_measured(path, folder / f"report_{label(size)}", args.workers)
        previous = next((e for e in entries if e["tokens"] == size and e.get("workers") == args.workers), None)
        entry = dict(tokens=size, requests=requests, file_gb=round(path.stat().st_size / 1e9, 3),
                     generate_seconds=round(generated or (previous or {}).get("generate_seconds", 0.0), 1),
                     workers=args.workers, machine=machine(), date=time.strftime("%Y-%m-%d"), commit=commit(), **run)
        entries = [e for e in entries if e is not previous] + [entry]
        print(json.dumps({k: v for k, v in entry.items() if k not in ("steps", "machine")}), flush=True)
        store.write_text(json.dumps(entries, indent=1) + "\n")
        store.with_suffix(".md").write_text(write_markdown(entries))
    print(store.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
