"""Forward and cached-decode speed of minimoe's dense Llama next to transformers' LlamaForCausalLM.

Same config, same weights, same threads, same dtype. Prints a table and, with --out, saves it.

    python benchmarks/bench_dense.py                         # CPU, fp32 and bf16, all cores torch sees
    python benchmarks/bench_dense.py --threads 2 --out benchmarks/results/dense_cpu.md

forward tokens/s = batch * seq_len / time of one full forward (logits for every position);
decode tokens/s  = batch * new_tokens / time of greedy generation after the prompt (prefill included,
                   so this is what a user waits for), ours with ``minimoe.model.generate`` and transformers with
                   ``generate(do_sample=False)``; both produce the same tokens, which is asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers

from minimoe.model import generate
from minimoe.hf import to_hf
from minimoe.model import ModelConfig, Transformer


def best_times(ours, theirs, repeats: int) -> tuple[float, float]:
    """Best wall time of each of two functions, timed alternately so that a burst of load on a shared
    machine hits both of them, not one."""
    ours(), theirs()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((ours, theirs)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def bench(args, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                         num_kv_heads=args.kv_heads, max_seq_len=args.prompt + args.new + 8,
                         rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192))
    ours = Transformer(config).eval()
    theirs = to_hf(ours).eval().to(dtype)
    ours = ours.to(dtype)
    tokens = torch.randint(0, args.vocab, (args.batch, args.prompt))
    rows = []
    with torch.inference_mode():
        t_ours, t_theirs = best_times(lambda: ours(tokens), lambda: theirs(tokens).logits, args.repeats)
        rows.append(dict(what="forward", dtype=str(dtype).removeprefix("torch."),
                         ours=args.batch * args.prompt / t_ours, theirs=args.batch * args.prompt / t_theirs))

        prompt = tokens[:, : args.prompt]
        ours_out = generate(ours, prompt, args.new)
        theirs_out = theirs.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                     pad_token_id=0)
        if dtype == torch.float32:  # bf16 rounding may flip near-ties between the two implementations
            assert torch.equal(ours_out, theirs_out), "greedy tokens differ from transformers"
        t_ours, t_theirs = best_times(
            lambda: generate(ours, prompt, args.new),
            lambda: theirs.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                    pad_token_id=0),
            args.repeats)
        rows.append(dict(what="decode", dtype=str(dtype).removeprefix("torch."),
                         ours=args.batch * args.new / t_ours, theirs=args.batch * args.new / t_theirs))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the table (markdown) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [row for name in args.dtypes.split(",") for row in bench(args, getattr(torch, name))]
    header = (f"minimoe vs transformers {transformers.__version__} LlamaForCausalLM, torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}, {args.threads} threads\n"
              f"config: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
              f"vocab {args.vocab}, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens; "
              f"best of {args.repeats}\n")
    lines = ["| what | dtype | minimoe tokens/s | transformers tokens/s | ratio |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['what']} | {r['dtype']} | {r['ours']:,.0f} | {r['theirs']:,.0f} | {r['ours'] / r['theirs']:.2f}x |"
              for r in rows]
    ratios = [r["ours"] / r["theirs"] for r in rows]
    table = header + "\n" + "\n".join(lines) + f"\n\ngeometric mean ratio {statistics.geometric_mean(ratios):.2f}x\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("```\n$ python benchmarks/bench_dense.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None)
                + "\n```\n\n" + table)


if __name__ == "__main__":
    main()
