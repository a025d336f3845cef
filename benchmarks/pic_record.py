"""Record a finished ``minimoe pic-experiment`` run in benchmarks/results/ (markdown + JSON).

    python benchmarks/pic_record.py RUN_DIR --name gpu --machine "2x NVIDIA H200" --command "minimoe pic-experiment ..."

writes ``benchmarks/results/pic_<name>.md`` (the machine, the command, the tables of ``results.md``) and
``pic_<name>.json`` (``summary.json`` plus every run's test scores and dev curve; the memory-to-text attention
map is kept for the global baseline at the middle ratio only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pic_record", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the --out directory of a finished pic-experiment")
    parser.add_argument("--name", required=True, help="suffix of the result files, e.g. gpu")
    parser.add_argument("--machine", required=True, help="the machine the run used, in words")
    parser.add_argument("--command", required=True, help="the command that produced the run")
    parser.add_argument("--notes", help="a markdown file appended to the .md (what the numbers mean, misses)")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    for name in ("summary.json", "results.md"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} not found: is {run} the --out directory of a finished run?")
    summary = json.loads((run / "summary.json").read_text())
    runs = []
    for path in sorted((run / "runs").glob("*.json")):
        result = json.loads(path.read_text())
        result.pop("attention", None)  # the summary keeps the one map the report uses
        runs.append(result)
    summary["runs"] = runs
    summary["machine"], summary["command"] = args.machine, args.command
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"pic_{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    header = f"# PIC vs ICAE-global: recorded run\n\nMachine: {args.machine}\n\nCommand:\n\n    {args.command}\n\n"
    notes = "" if args.notes is None else "\n" + Path(args.notes).read_text()
    (RESULTS / f"pic_{args.name}.md").write_text(header + (run / "results.md").read_text() + notes)
    print(f"wrote {RESULTS / f'pic_{args.name}.md'} and pic_{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
