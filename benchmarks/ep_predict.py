"""Predict dispatch + combine on two GPUs from the one-GPU overheads and the recorded two-GPU raw exchange.

    python benchmarks/ep_predict.py $OUT/ep_host_overhead.json --out $OUT/ep_predict
    python benchmarks/ep_predict.py ONE_GPU.json --recorded benchmarks/results/ep_h200x2.json

The model (a prediction for a multi-GPU run to confirm, not a measurement):

    ours(2 GPUs)  ≈  raw(2 GPUs)  +  [ours(1 GPU) − raw(1 GPU)]         predicted raw/ours = raw(2) / ours(2)

* ours(1 GPU) − raw(1 GPU): what our dispatch + combine costs beyond the bare collectives, measured at world size
  1 over NCCL in ``ep_host_overhead.py`` (same call, same card): the host time of the eager ops, the syncs and
  the extra HBM passes. Decode size: the "collectives forced" rows (the NCCL calls a real step makes) minus the
  raw collectives; large sizes: the "large" rows (ours eager, raw = the same rows' exchange).
* raw(2 GPUs): the bare exchange of the same bytes between two H200s recorded with ``bench_ep.py``
  (``benchmarks/results/ep_h200x2.json``): per variant and dispatched MiB per rank, the nearest recorded size;
  replicate is matched with "token_rank static" (both send every token to every rank).
* It assumes the overhead does not grow with the second GPU (the per-call NCCL host cost at 2 ranks is close to
  one rank's) and that the wire and our copies do not overlap (they do not: the copies sit before and after it).
  The "before" rows predict the old code's recorded two-GPU ratio, a check of the model itself.
* hierarchical (the current code) is not predicted: at world size 1 every rank is on one node, where it runs
  only its intra-node leg (token_rank's cost), while the recorded run had two nodes of one GPU each, where it
  runs both legs and pays two syncs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RECORDED = Path(__file__).resolve().parent / "results" / "ep_h200x2.json"
MATCH = {"token_expert": "token_expert", "token_rank": "token_rank", "hierarchical": "hierarchical",
         "replicate": "token_rank static", "token_rank static": "token_rank static"}


def recorded_raw(recorded: dict) -> dict:
    """{(variant, tokens or MiB, "shape"|"sweep"): (raw µs, recorded raw/ours of the code of then)}."""
    table = {}
    for row in recorded.get("shapes", []):
        if row.get("code", "before") == "before" and not row["format"].endswith("CUDA graph"):
            table[(row["format"], row["tokens_per_rank"], "shape")] = (row["raw_us"], row["fraction_of_raw"])
    for row in recorded.get("sweep", []):
        if row.get("code", "before") == "before" and not row["format"].endswith("CUDA graph"):
            table[(row["format"], row["dispatch_MiB_per_rank"], "sweep")] = (row["raw_us"], row["fraction_of_raw"])
    return table


def nearest(table: dict, variant: str, mib: float):
    sizes = [k[1] for k in table if k[0] == variant and k[2] == "sweep"]
    if not sizes:
        return None, None
    size = min(sizes, key=lambda s: abs(s - mib) / max(s, mib))
    return size, table[(variant, size, "sweep")]


def one_node_only(fmt: str, code: str) -> bool:
    """Whether the one-GPU figure is the one-node path of a format that runs differently on the recorded two nodes."""
    return fmt == "hierarchical" and code != "before"


def predict(one_gpu: dict, recorded: dict) -> list[dict]:
    raw2 = recorded_raw(recorded)
    rows = []
    decode = {r["variant"]: r for r in one_gpu.get("decode", [])}
    raw1 = {"a2a": decode.get("raw all_to_all_single pair (token_rank splits)"),
            "replicate": decode.get("raw all_gather + reduce_scatter (replicate)")}
    tokens = one_gpu.get("sizes", {}).get("decode", 128)
    for label, r in decode.items():
        if label.startswith("raw") or ("after" in label and "forced" not in label and "static" not in label):
            continue  # after: the rows with the collectives forced carry the NCCL calls a real step makes
        fmt = label.split(" after")[0].split(" before")[0]
        base = raw1["replicate" if fmt == "replicate" else "a2a"]
        key = (MATCH[fmt], tokens, "shape")
        if base is None or key not in raw2:
            continue
        overhead = r["total_us"] - base["total_us"]
        ours2 = raw2[key][0] + overhead
        code = "before" if "before" in label else "after, block size known" if "known" in label else "after"
        if one_node_only(fmt, code):
            continue
        rows.append(dict(format=fmt, code=code, size=f"{tokens} tokens",
                         overhead_1gpu_us=overhead, raw_2gpu_us=raw2[key][0], predicted_ours_2gpu_us=ours2,
                         predicted_raw_over_ours=raw2[key][0] / ours2,
                         recorded_raw_over_ours=raw2[key][1] if "before" in label else None))
    for r in one_gpu.get("large", []):
        size, found = nearest(raw2, MATCH[r["format"]], r["MiB_per_rank"])
        if found is None or one_node_only(r["format"], r["impl"]):
            continue
        overhead = r["ours_us"] - r["raw_us"]
        ours2 = found[0] + overhead
        rows.append(dict(format=r["format"], code=r["impl"], size=f"{r['MiB_per_rank']:.0f} MiB (recorded {size:.0f})",
                         overhead_1gpu_us=overhead, raw_2gpu_us=found[0], predicted_ours_2gpu_us=ours2,
                         predicted_raw_over_ours=found[0] / ours2,
                         recorded_raw_over_ours=found[1] if r["impl"] == "before" else None))
    return rows


def table(rows: list[dict], one_gpu: dict) -> str:
    lines = [f"Predicted 2-GPU dispatch + combine from one {one_gpu.get('device', '?')} (world size 1) and the "
             "recorded 2 x H200 raw exchange: ours(2) = raw(2) + [ours(1) - raw(1)]; a prediction to confirm on two "
             "GPUs. 'recorded' = what bench_ep.py measured on 2 x H200 for the code of then (before rows only). "
             "hierarchical after: not predicted (one GPU is one node, where it runs one leg; the recorded run had "
             "two one-GPU nodes, where it runs two).", "",
             "| format | code | size | overhead on 1 GPU µs | raw on 2 GPUs µs | predicted ours µs | predicted raw/ours "
             "| recorded raw/ours |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        recorded = "—" if r["recorded_raw_over_ours"] is None else f"{r['recorded_raw_over_ours']:.2f}"
        lines.append(f"| {r['format']} | {r['code']} | {r['size']} | {r['overhead_1gpu_us']:.0f} | "
                     f"{r['raw_2gpu_us']:.0f} | {r['predicted_ours_2gpu_us']:.0f} | {r['predicted_raw_over_ours']:.2f} "
                     f"| {recorded} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("one_gpu", help="the JSON written by ep_host_overhead.py")
    parser.add_argument("--recorded", default=str(RECORDED), help="bench_ep.py JSON of a 2-GPU run (default: %(default)s)")
    parser.add_argument("--out", help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    one_gpu = json.loads(Path(args.one_gpu).read_text())
    rows = predict(one_gpu, json.loads(Path(args.recorded).read_text()))
    text = table(rows, one_gpu)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
        Path(args.out + ".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
