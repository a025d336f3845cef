"""Time one training step of the mechanism experiment's compressor, alone and with several processes sharing a GPU.

    python benchmarks/pic_mech_step_time.py --processes 1,4,8        # SmolLM2-135M shapes, random weights, CUDA
    python benchmarks/pic_mech_step_time.py --tiny --device cpu      # the same code at toy sizes
    python benchmarks/pic_mech_step_time.py --compile --reader-lora  # blocks compiled, the decoder adapted too

Weights are random (timing depends on shapes only): 30 blocks, hidden 576, 9 / 3 heads, FFN 1536, vocabulary
49,152, a 256-token context, 16 contexts per step, 4 questions and 2 addressed repeats per context, memory handed
over as keys/values. Prints ms per step per process and steps per second over all processes, for the global mask
at 4x (the most memory slots) and PIC at 64x, and the cost of one dev evaluation (256 contexts) and of greedy
answers to 2,048 test questions; writes ``pic_mech_step_time.json`` under ``$OUT`` when it is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from minimoe.compress.compressor import Compressor
from minimoe.compress.masks import build_layout
from minimoe.compress.mechanism_data import MechanismSet, Rows
from minimoe.compress.mechanism_training import compile_blocks, greedy_answers, teacher_forced, train_step
from minimoe.model.model_config import ModelConfig
from minimoe.model.transformer import Transformer

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
               max_seq_len=2048, tie_word_embeddings=True, rope_theta=100000.0)
TINY = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
            max_seq_len=2048, tie_word_embeddings=True, rope_theta=10000.0)


def random_rows(generator, contexts: int, per_context: int, prompt: int, target: int, vocab: int) -> Rows:
    count = contexts * per_context
    ids = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    return Rows([i // per_context for i in range(count)], [ids(prompt) for _ in range(count)],
                [ids(target) for _ in range(count)], [[True] * target for _ in range(count)])


def random_set(generator, contexts: int, n: int, vocab: int) -> MechanismSet:
    questions = random_rows(generator, contexts, 4, 16, 5, vocab)
    return MechanismSet(torch.randint(3, vocab, (contexts, n), generator=generator), questions,
                        random_rows(generator, contexts, 1, 12, 60, vocab), ["x"] * len(questions.doc),
                        [0] * len(questions.doc), [set() for _ in questions.doc])


def child(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = ModelConfig(**(TINY if args.tiny else SMOLLM2))
    base = Transformer(config).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    n, bf16 = 256, device.type == "cuda"
    out = {}
    for name, variant, ratio, chunk in (("global_4x", "global", 4, None), ("pic_64x", "pic", 64, 64)):
        options = dict(positions="restart") if variant == "pic" else {}
        layout = build_layout(variant, n, ratio, chunk, **options)
        compressor = Compressor(base, layout.num_memory, lora_rank=16, lora_alpha=32.0,
                                reader_lora=args.reader_lora).to(device)
        if args.compile:
            compile_blocks(compressor)
        optimizer = torch.optim.AdamW([p for p in compressor.parameters() if p.requires_grad], lr=1e-3,
                                      fused=device.type == "cuda")
        batch = random_set(generator, args.batch, n, config.vocab_size)
        repeats = random_rows(generator, args.batch, 2, 12, 60, config.vocab_size)
        started = time.perf_counter()
        for _ in range(3):  # warm-up (and compilation)
            train_step(compressor, optimizer, layout, batch.contexts, batch.questions, repeats, 1, 0, bf16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        warmup = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(args.steps):
            train_step(compressor, optimizer, layout, batch.contexts, batch.questions, repeats, 1, 0, bf16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = {"ms_per_step": 1000 * (time.perf_counter() - started) / args.steps, "warmup_s": warmup}
        if args.evaluate:
            compressor.eval()
            dev = random_set(generator, 256 if not args.tiny else 8, n, config.vocab_size)
            started = time.perf_counter()
            teacher_forced(compressor, layout, dev, 1, 0, bf16)
            out[name]["dev_eval_s"] = time.perf_counter() - started
            test = random_set(generator, 512 if not args.tiny else 8, n, config.vocab_size)
            started = time.perf_counter()
            greedy_answers(compressor, layout, test, 1, {2}, str, bf16)
            out[name]["greedy_test_s"] = time.perf_counter() - started
        compressor.peft.unload()  # take the adapters out of `base` for the next layout
        del compressor, optimizer
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1", help="comma list of concurrent process counts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--compile", action="store_true", help="compile every block (compile_blocks)")
    parser.add_argument("--reader-lora", action="store_true", help="the decoder has its own LoRA too")
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = {}
    for count in [int(x) for x in args.processes.split(",")]:
        command = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--batch", str(args.batch),
                   "--device", args.device] + [f"--{flag}" for flag in ("tiny", "compile", "reader-lora")
                                               if getattr(args, flag.replace("-", "_"))]
        children = [subprocess.Popen(command + (["--evaluate"] if count == 1 else []), stdout=subprocess.PIPE,
                                     text=True, env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(count)]
        outputs = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in children]
        row = {"processes": count, "children": outputs}
        for name in ("global_4x", "pic_64x"):
            ms = [o[name]["ms_per_step"] for o in outputs]
            row[name] = {"ms_per_step": sum(ms) / len(ms), "steps_per_second": sum(1000 / m for m in ms)}
        results[count] = row
        print(f"{count} process(es): " + "; ".join(f"{name} {row[name]['ms_per_step']:.0f} ms/step per process, "
                                                    f"{row[name]['steps_per_second']:.1f} steps/s in all"
                                                    for name in ("global_4x", "pic_64x")), flush=True)
        if count == 1:
            print(json.dumps(outputs[0]), flush=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "pic_mech_step_time.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
