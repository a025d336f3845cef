"""Turn the JSON of ``bench_ep.py`` into a markdown report: correctness, the sweep against raw all-to-all, the
decode and DeepEP shapes, and the trace replay per placement, with the targets marked
(≥ 80 % of raw bandwidth at ≥ 64 MiB per rank, ≤ 2x raw time at ≤ 1 MiB).

    python benchmarks/bench_ep_report.py benchmarks/results/ep_h200x2.json > benchmarks/results/ep_h200x2.md
"""
from __future__ import annotations

import json
import sys


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format(row[k], f) if k in row else "—" for k, _, f in columns) + " |")
    return "\n".join(lines)


LEGEND = ("Columns: MiB/rank = rows this rank dispatches (all legs; rows it keeps for itself included) x hidden x "
          "2 bytes; GB/s = bytes sent to other ranks, dispatch + combine, self-copies excluded, per second; raw = the "
          "bare collectives moving the same rows with ready buffers (one all_to_all_single per leg and its reverse: "
          "two calls, the hierarchical format's own four; all-gather + reduce-scatter for replicate); raw/ours = raw "
          "time / our time; graph = the same captured in a CUDA graph and replayed; code = after (the package) or "
          "before (the frozen code of before the sync-free rewrite); host µs = until the eager call returns.")
RUN_COLUMNS = [("format", "variant", "s"), ("code", "code", "s"), ("dispatch_MiB_per_rank", "MiB/rank", ".1f"),
               ("tokens_per_rank", "tokens/rank", "d"), ("host_us", "host µs", ".0f"), ("ours_us", "ours µs", ".0f"),
               ("raw_us", "raw µs", ".0f"), ("fraction_of_raw", "raw/ours", ".2f"),
               ("ours_graph_us", "ours graph µs", ".0f"), ("raw_graph_us", "raw graph µs", ".0f"),
               ("graph_fraction_of_raw", "graph raw/ours", ".2f"), ("ours_GBps", "ours GB/s", ".1f"),
               ("raw_GBps", "raw GB/s", ".1f")]


def report(results: dict) -> str:
    out = [f"machine: {results['world_size']} x {results['device']}, backend {results['backend']}, NCCL "
           f"{results['nccl']}, torch {results['torch']}, python {results['python']}; \"nodes\" of "
           f"{results['gpus_per_node']} GPU(s)", "", f"command: `{results['command']}`", ""]
    if "correctness" in results:
        out += ["## Correctness against one process", "",
                table(results["correctness"], [("check", "check", "s"), ("wire_format", "wire format", "s"),
                                               ("max_abs_error", "max abs error", ".2e"),
                                               ("bytes_match", "bytes == measure", "")]), ""]
    if "sweep" in results:
        rows = [dict(r, meets=("yes" if r["fraction_of_raw"] >= 0.8 else "no") if r["dispatch_MiB_per_rank"] >= 63
                     else ("yes" if r["ours_us"] <= 2 * r["raw_us"] else "no") if r["dispatch_MiB_per_rank"] <= 1.1
                     else "") for r in results["sweep"]]
        out += ["## Dispatch + combine against two raw all_to_all_single calls with the same splits", "",
                "Uniform top-8 routing over 256 experts, hidden 7168, bf16, contiguous placement. `target`: "
                "≥ 80 % of raw at ≥ 64 MiB per rank, ≤ 2x raw time at ≤ 1 MiB.", "", LEGEND, "",
                table(rows, RUN_COLUMNS + [("meets", "target", "s")]), ""]
    if "shapes" in results:
        out += ["## Serving shapes (hidden 7168, top-8 of 256 experts, bf16)", "", LEGEND, "",
                table(results["shapes"], RUN_COLUMNS[:1] + [("tokens_per_rank", "tokens/rank", "d")]
                      + [c for c in RUN_COLUMNS[1:] if c[0] != "tokens_per_rank"]), ""]
    if "replay" in results:
        rows = [dict(r, inter_MB=(r["dispatch_inter_bytes"] + r["combine_inter_bytes"]) / 1e6,
                     intra_MB=(r["dispatch_intra_bytes"] + r["combine_intra_bytes"]) / 1e6,
                     predicted_MB=(r["predicted_inter_bytes"] + r["predicted_intra_bytes"]) / 1e6)
                for r in results["replay"]]
        out += ["## Trace replay of the bundled model's trace (decode tokens; hidden 7168, bf16)", "",
                table(rows, [("placement", "placement", "s"), ("grouping", "grouping", "s"),
                             ("wire_format", "wire format", "s"), ("inter_MB", "inter-node MB", ".1f"),
                             ("intra_MB", "intra-node MB", ".1f"), ("predicted_MB", "measure MB", ".1f"),
                             ("bytes_match", "equal", ""), ("dispatch_ms", "dispatch ms", ".0f"),
                             ("combine_ms", "combine ms", ".0f"), ("load_max_over_mean", "load max/mean", ".3f")]),
                ""]
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        print(report(json.load(file)))
