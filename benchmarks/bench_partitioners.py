"""Locality placement with minimoe's FM refinement and with Mt-KaHyPar, on held-out decode traffic.

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_partitioners.py [--quick] [--cache DIR]
Writes benchmarks/results/partitioners.md (and every seed's numbers with --json FILE). Needs
`pip install mtkahypar`.

Every placement is fitted on the prefill tokens and measured on the decode tokens after each request's
online window (``minimoe.placement.experiments.masks``), with the same random request sources (seeded
random balanced grouping) and the same slot budget for every method. Both partitioners run on the same
merged hypergraph with the same node load cap (epsilon = 0.1) and get the same replica and GPU steps. Traces:

* the bundled 4-domain model (``minimoe.traces.bundled_trace``, 500 requests per domain);
* synthetic traces (``minimoe.traces.synthetic_trace``) at the expert counts of real models;
* transformers Mixtral, Qwen3-MoE and OLMoE models built from configs, *untrained* (random weights), recorded
  with ``minimoe.traces.record`` on held-out corpus prompts with the bundled tokenizer.
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from minimoe.placement import Topology, group, measure, place  # noqa: E402
from minimoe.placement.experiments import default_window, masks  # noqa: E402
from minimoe.placement.hypergraph import DEFAULT_MTKAHYPAR_PRESET, MTKAHYPAR_PRESETS  # noqa: E402
from minimoe.traces import BUNDLED_MODEL, Trace, bundled_trace, record, synthetic_trace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NOTES = [
    "Notes.",
    "",
    "* Both partitioners see the same merged hypergraph (expert loads as vertex weights, one fixed vertex per node "
    "for the request sources), the same node load cap and slot limits, and get the same replica and GPU steps. "
    "Mt-KaHyPar runs the preset named above (`--mtkahypar-preset`) on one thread with the seed; its partition is then made to fit the "
    "slots with the fewest moves. `fm` is minimoe's own (`minimoe.placement.locality`, `refinement`).",
    "* Bundled: `bundled_trace()` of the 4-domain model trained in chapter 3, 500 held-out prompts per domain, 32 "
    "sampled decode tokens each. Synthetic: `synthetic_trace(num_requests=512, tokens_per_request=64, "
    "num_layers=4, ...)`, half of each request prefill; 4 domains, skewed popularity, per-request preferences.",
    "* transformers models: `MixtralForCausalLM` (8 experts, top-2), `OlmoeForCausalLM` (64, top-8) and "
    "`Qwen3MoeForCausalLM` (128, top-8) built from configs (hidden 64, 4 layers, vocab 4096 = the bundled "
    "tokenizer) with transformers' default random initialisation, recorded with `minimoe.traces.record` on 64 "
    "held-out prompts per domain (temperature 0.7, top-p 0.9, 32 new tokens). Untrained means the router is a "
    "random projection of hidden states that are mostly the token's own embedding: routing is a fixed function of "
    "the token and its context, with no learned expert specialisation, and decode samples near-uniform random "
    "tokens whose routing shares little with the prompt's. Their savings (1-10%) show how each partitioner "
    "handles structure-poor routing, not what trained Mixtral, OLMoE or Qwen3 checkpoints would give.",
    "* Differences of a few tenths of a percent are within the spread over seeds shown in brackets.",
]
EPSILON = 0.1
METHODS = (("contiguous", "contiguous", {}), ("eplb", "eplb", {}),
           ("locality fm", "locality", dict(partitioner="fm")),
           ("locality mtkahypar", "locality", dict(partitioner="mtkahypar")),
           ("locality (default)", "locality", {}))


def hf_model(family: str, vocab_size: int, seed: int):
    """An untrained transformers MoE LM at the expert count and top-k of the real model family."""
    import torch
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    config = {"mixtral": lambda: transformers.MixtralConfig(**common, intermediate_size=128, num_local_experts=8,
                                                             num_experts_per_tok=2),
              "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**common, intermediate_size=128,
                                                                moe_intermediate_size=32, num_experts=128,
                                                                num_experts_per_tok=8, norm_topk_prob=True),
              "olmoe": lambda: transformers.OlmoeConfig(**common, intermediate_size=32, num_experts=64,
                                                        num_experts_per_tok=8)}[family]()
    torch.manual_seed(seed)
    model_class = {"mixtral": transformers.MixtralForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM,
                   "olmoe": transformers.OlmoeForCausalLM}[family]
    return model_class(config).eval()


def converted_trace(family: str, num_per_domain: int, cache: Path | None) -> Trace:
    path = cache / f"{family}_{num_per_domain}.npz" if cache else None
    if path and path.exists():
        return Trace.load(path)
    import torch

    from minimoe.traces.workload import minimoe_tokenize, run_prompts

    torch.set_num_threads(1)
    texts, domains = run_prompts(BUNDLED_MODEL, num_per_domain, seed=1)
    tokenize = minimoe_tokenize(BUNDLED_MODEL)
    prompts = [tokenize(text) for text in texts]
    model = hf_model(family, 4096, seed=0)
    trace = record(model, prompts, 32, domains, batch_size=32, name=f"untrained transformers {family}",
                   temperature=0.7, top_p=0.9, seed=0)
    if path:
        trace.save(path)
    return trace


def traces(quick: bool, cache: Path | None):
    """(name, trace, note, [(topology, num_replicas)])"""
    per_domain = 50 if quick else 500
    path = cache / f"bundled_{per_domain}.npz" if cache else None
    if path and path.exists():
        bundled = Trace.load(path)
    else:
        bundled = bundled_trace(num_per_domain=per_domain)
        if path:
            bundled.save(path)
    yield ("bundled minimoe 4-domain (32 experts, top-2)", bundled, "trained (chapter 3)",
           [((4, 2), 32), ((4, 2), 40), ((2, 2), 32), ((8, 1), 32)])
    requests = 64 if quick else 512
    for experts, top_k, like, settings in ((64, 8, "OLMoE", [((8, 1), 64), ((4, 2), 64)]),
                                           (60, 4, "Qwen1.5-MoE", [((4, 1), 60)]),
                                           (128, 8, "Qwen3-MoE", [((8, 1), 128), ((4, 2), 136)]),
                                           (256, 8, "DeepSeek-V3", [((8, 1), 256), ((8, 8), 320)])):
        trace = synthetic_trace(num_requests=requests, tokens_per_request=64, num_layers=4, num_experts=experts,
                                top_k=top_k, seed=0)
        yield (f"synthetic {experts} experts, top-{top_k} ({like}-sized)", trace, "synthetic", settings)
    per_domain = 16 if quick else 64
    for family, settings in (("mixtral", [((4, 1), 8), ((2, 2), 8)]), ("olmoe", [((8, 1), 64), ((4, 2), 64)]),
                             ("qwen3_moe", [((8, 1), 128)])):
        trace = converted_trace(family, per_domain, cache)
        yield (f"transformers {family} ({trace.num_experts} experts, top-{trace.top_k})", trace,
               "untrained", settings)


def compare(trace: Trace, topology: Topology, num_replicas: int, seed: int, preset: str) -> dict[str, dict]:
    """method -> measured row, for one seed (of the request sources and of the partitioners)."""
    token_sets = masks(trace, default_window(trace))
    sources = group(trace, topology, "random", seed=seed)
    rows, placements = {}, {}
    for label, method, options in METHODS:
        if method == "locality":
            options = dict(options, sources=sources, epsilon=EPSILON, seed=seed, mtkahypar_preset=preset)
        start, cpu = time.perf_counter(), time.process_time()
        placement = place(trace, topology, method, tokens=token_sets["prefill"], num_replicas=num_replicas, **options)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        report = measure(trace, placement, topology, sources=sources, tokens=token_sets["eval"])
        placements[label] = placement
        rows[label] = dict(inter_node_bytes=report.inter_node_bytes, load_max_over_mean=report.load_max_over_mean,
                           fit_seconds=seconds, fit_cpu_seconds=cpu)
    rows["locality (default)"]["same_placement_as_fm"] = placements["locality (default)"] == placements["locality fm"]
    for row in rows.values():
        row["cut_vs_contiguous"] = 1 - row["inter_node_bytes"] / rows["contiguous"]["inter_node_bytes"]
        row["cut_vs_eplb"] = 1 - row["inter_node_bytes"] / rows["eplb"]["inter_node_bytes"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small traces (a smoke run)")
    parser.add_argument("--cache", default=None, help="folder to keep recorded traces in between runs")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the random request sources and partitioners")
    parser.add_argument("--out", default=str(RESULTS / "partitioners"), help="output path without extension")
    parser.add_argument("--json", default=None, help="also write every seed's numbers to this JSON file")
    parser.add_argument("--mtkahypar-preset", choices=MTKAHYPAR_PRESETS, default=DEFAULT_MTKAHYPAR_PRESET,
                        help="Mt-KaHyPar's preset (default: %(default)s, minimoe's)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    import mtkahypar  # noqa: F401  (fail early with the import error when it is missing)

    started = time.perf_counter()
    table, records, verdicts, fm_wins = [], [], [], 0
    for name, trace, note, settings in traces(args.quick, cache):
        for (nodes, per_node), num_replicas in settings:
            topology = Topology(num_nodes=nodes, gpus_per_node=per_node)
            runs = [compare(trace, topology, num_replicas, seed, args.mtkahypar_preset) for seed in seeds]
            mean = {label: {key: float(np.mean([run[label][key] for run in runs])) for key in runs[0][label]}
                    for label, _, _ in METHODS}
            cuts = {label: [run[label]["cut_vs_contiguous"] for run in runs] for label, _, _ in METHODS}
            fm, mt = mean["locality fm"]["inter_node_bytes"], mean["locality mtkahypar"]["inter_node_bytes"]
            default = mean["locality (default)"]["inter_node_bytes"]
            verdicts.append((f"{name}, {nodes}x{per_node}, {num_replicas} slots", default, min(fm, mt)))
            fm_wins += fm < mt
            for label, _, _ in METHODS:
                row = mean[label]
                spread = f" ({min(cuts[label]):+.1%} to {max(cuts[label]):+.1%})" if label.startswith("locality") \
                    and len(seeds) > 1 else ""
                table.append(f"| {name} | {nodes}x{per_node} | {num_replicas} | {label} | "
                             f"{row['inter_node_bytes'] / 1e9:.3f} | {row['cut_vs_contiguous']:+.1%}{spread} | "
                             f"{row['cut_vs_eplb']:+.1%} | {row['load_max_over_mean']:.2f} | "
                             f"{row['fit_cpu_seconds']:.1f} |")
                records.append(dict(trace=name, kind=note, topology=f"{nodes}x{per_node}", num_replicas=num_replicas,
                                    tokens=trace.num_tokens, method=label, seeds=seeds, mean=row,
                                    per_seed=[run[label] for run in runs]))
            print("\n".join(table[-len(METHODS):]), flush=True)
    minutes = (time.perf_counter() - started) / 60
    header = ("| trace | cluster | slots | method | inter-node GB | cut vs contiguous (seed range) | cut vs EPLB "
              "| load max/mean | fit s (CPU) |\n|---|---|---:|---|---:|---:|---:|---:|---:|")
    lines = [
        "# Locality placement: minimoe's FM refinement vs Mt-KaHyPar, on held-out decode traffic",
        "",
        "```",
        f"$ OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_partitioners.py"
        f"{' --quick' if args.quick else ''} --seeds {args.seeds}",
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs; python "
        f"{platform.python_version()}, numpy {np.__version__}, transformers {_version('transformers')}, mtkahypar "
        f"{_version('mtkahypar')}; one thread; {minutes:.0f} minutes. Fitted on prefill tokens, measured on the "
        "decode tokens after each request's online window; random request sources; node load cap epsilon = "
        f"{EPSILON} for both partitioners; Mt-KaHyPar's preset `{args.mtkahypar_preset}`. Every number is the mean over seeds {args.seeds} (request sources "
        "and partitioner seeds), the cut's range over the seeds in brackets. inter-node GB = de-duplicated bytes "
        "(hidden 7168, bf16 dispatch and combine); load = tokens per GPU, max/mean, on the evaluated tokens; "
        "fit s = CPU seconds of `place`.",
        "",
        header, *table, "",
        f"FM below Mt-KaHyPar (mean bytes) in {fm_wins} of {len(verdicts)} settings; the default "
        f"(`partitioner='fm'`, the same placements) is at or below both partitioners in "
        f"{sum(d <= best * (1 + 1e-12) for _, d, best in verdicts)} of {len(verdicts)}"
        + "".join(f"; {label}: {d / best - 1:+.2%} bytes vs Mt-KaHyPar" for label, d, best in verdicts
                  if d > best * (1 + 1e-12)) + ".",
        "",
        *NOTES,
    ]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    print(lines[-1])


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
