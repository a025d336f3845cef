"""``minimoe demo``: the whole dense path in one minute on a CPU.

1. build a tiny Llama 3 (GQA, Llama 3.1 RoPE scaling, untied head) over raw bytes (vocab 256);
2. train it for a few seconds on the Zen of Python, so that its generations are recognisable;
3. convert it to transformers' ``LlamaForCausalLM`` and check both give the same logits and the same
   greedy tokens (with the KV cache on our side and transformers' ``generate`` on theirs);
4. print a generation and, optionally, save the checkpoint (config.json + model.safetensors).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import time

import torch

from minimoe.model.generate import generate
from minimoe.model.model_config import ModelConfig
from minimoe.model.transformer import Transformer, lm_loss

DEMO_CONFIG = dict(vocab_size=256, hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=256, max_seq_len=256, tie_word_embeddings=False,
                   rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64))


def zen_bytes() -> torch.Tensor:
    """The Zen of Python as a 1-D tensor of byte values (the text ships with CPython as rot13)."""
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the poem
        import this
    return torch.tensor(list(codecs.decode(this.s, "rot13").encode()), dtype=torch.long)


def train_bytes(model: Transformer, data: torch.Tensor, steps: int, seq_len: int = 64, batch_size: int = 16,
                lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Plain next-byte training on random windows of ``data``; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
        batch = torch.stack([data[s : s + seq_len] for s in starts])  # (B, T)
        loss = lm_loss(model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def run_demo(steps: int = 150, seed: int = 0, out: str | None = None) -> int:
    from minimoe.hf.convert import to_hf

    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**DEMO_CONFIG))
    print(f"tiny Llama 3: {model.num_parameters():,} parameters, "
          f"{model.config.num_heads} query heads sharing {model.config.num_kv_heads} KV heads")
    data = zen_bytes()
    start = time.perf_counter()
    losses = train_bytes(model, data, steps, seed=seed)
    if losses:
        print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s: loss {losses[0]:.2f} -> {losses[-1]:.2f}")

    hf_model = to_hf(model).eval()
    prompts = [b"Beautiful is", b"Errors should"]  # different lengths: the batch is left-padded
    width = max(len(p) for p in prompts)
    prompt = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])  # (2, width)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # 0 = padding
    with torch.no_grad():
        ours, theirs = model(prompt, attention_mask=mask), hf_model(prompt, attention_mask=mask).logits
    diff = ((ours - theirs).abs() * mask[..., None]).max().item()
    ours_tokens = generate(model, prompt, 60, attention_mask=mask)
    theirs_tokens = hf_model.generate(prompt, attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=0)
    same = torch.equal(ours_tokens, theirs_tokens)
    print(f"max |logits - transformers logits| = {diff:.2e}; greedy tokens identical to transformers: {same}")
    for text_in, row in zip(prompts, ours_tokens):
        text_out = bytes(row[width:].tolist()).decode("utf-8", errors="replace")
        print(f"  {text_in.decode()!r} -> {text_out!r}")
    if out:
        model.save(out)
        print(f"saved the checkpoint to {out}")
    return 0 if diff < 1e-4 and same else 1
