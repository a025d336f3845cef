"""The compressor's structural identities (fp32, 1e-5), its agreement with transformers, and its errors.

- one chunk == the ICAE mask;
- chunk-local memory without memory-to-memory attention == compressing every chunk on its own;
- the single masked pass == an explicit chunk-by-chunk loop that carries memory keys/values in a KV cache;
- the same 4D mask and position ids give the same outputs in minimoe's model and transformers' Llama;
- gist == 500xCompressor's key/value hand-over with the adapters off.
"""

import pytest
import torch
from transformers import LlamaForCausalLM

from minimoe.compress.compressor import Compressor, final_hidden, kv_cache_from
from minimoe.compress.masks import MEMORY, TEXT, gist_mask, global_mask, pic_mask
from minimoe.compress.objectives import decoder_loss, greedy_from_embeds
from minimoe.hf import from_hf, to_hf
from minimoe.model import ModelConfig, Transformer

TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_model(seed=0, **overrides) -> Transformer:
    settings = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                    max_seq_len=96, init_std=0.15)
    settings.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**settings)).eval()


def compressor(num_memory, seed=0) -> Compressor:
    c = Compressor(tiny_model(seed), num_memory, lora_rank=4, seed=seed)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # LoRA starts as the identity (B = 0); perturb it so the adapters matter
        for name, p in c.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return c


@pytest.fixture(scope="module")
def context():
    return torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(7))


def test_one_chunk_equals_icae(context):
    c = compressor(6)
    torch.testing.assert_close(c.encode(context, pic_mask(24, 24, 4)), c.encode(context, global_mask(24, 6)), **TOL)


@pytest.mark.parametrize("layout", ["append", "interleave"])
@pytest.mark.parametrize("positions", ["continue", "restart"])
def test_chunk_local_memory_equals_compressing_each_chunk_alone(context, layout, positions):
    c = compressor(6)
    pic = pic_mask(24, 8, 4, layout, mem_sees_prev_mem=False, positions=positions)  # 3 chunks, 2 memory each
    together = c.encode(context, pic)  # (B, 6, H)
    for j in range(3):
        alone = global_mask(8, 2)  # chunk j on its own: [t_8j .. t_8j+7, m_2j, m_2j+1]
        slots = torch.cat([torch.nonzero((pic.chunk == j) & (pic.kind == k)).squeeze(1) for k in (TEXT, MEMORY)])
        x = torch.cat([c.base.embed(context[:, 8 * j:8 * j + 8]), c.memory[2 * j:2 * j + 2][None].expand(3, -1, -1)], 1)
        h = final_hidden(c.base, x, alone.attention_mask, pic.position_ids[:, slots])
        torch.testing.assert_close(together[:, 2 * j:2 * j + 2], h[:, 8:], **TOL)


@pytest.mark.parametrize("layout", ["append", "interleave"])
@pytest.mark.parametrize("mem_sees_prev_mem", [False, True])
@pytest.mark.parametrize("positions", ["continue", "restart"])
def test_single_masked_pass_equals_chunk_loop_with_kv_cache(context, layout, mem_sees_prev_mem, positions):
    c = compressor(12)
    pic = pic_mask(24, 6, 2, layout, mem_sees_prev_mem, positions)  # 4 chunks, 3 memory tokens each
    torch.testing.assert_close(c.encode(context, pic), c.encode_chunk_by_chunk(context, pic, mem_sees_prev_mem), **TOL)


def test_append_and_interleave_agree_when_positions_restart(context):
    c = compressor(6)
    a = c.encode(context, pic_mask(24, 8, 4, "append", True, "restart"))
    b = c.encode(context, pic_mask(24, 8, 4, "interleave", True, "restart"))
    torch.testing.assert_close(a, b, **TOL)
    assert not torch.allclose(a, c.encode(context, pic_mask(24, 8, 4, "interleave", True, "continue")), atol=1e-3)


@pytest.mark.parametrize("mask", [pic_mask(16, 8, 4, "interleave", True), gist_mask(12, 2, 6)],
                         ids=["pic-interleave", "gist"])
def test_same_4d_mask_and_positions_as_transformers_llama(mask):
    model = tiny_model(3)
    hf = to_hf(model, attn_implementation="eager").eval()
    size = mask.kind.numel()
    x = torch.randn(2, size, 32, generator=torch.Generator().manual_seed(1))
    additive = torch.zeros(mask.attention_mask.shape).masked_fill(~mask.attention_mask, torch.finfo(torch.float32).min)
    ours = model(inputs_embeds=x, attention_mask=mask.attention_mask, position_ids=mask.position_ids.expand(2, -1))
    theirs = hf(inputs_embeds=x, attention_mask=additive.expand(2, -1, -1, -1),
                position_ids=mask.position_ids.expand(2, -1)).logits
    torch.testing.assert_close(ours, theirs, **TOL)
    assert isinstance(hf, LlamaForCausalLM) and torch.equal(from_hf(hf).embed.weight, model.embed.weight)


def test_gist_equals_500x_key_value_handover_with_adapters_off(context):
    c = Compressor(tiny_model(5), 4, lora_rank=4, seed=5)  # B = 0: the encoder is the base model itself
    prompt = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    cache, start = c.memory_cache(context, global_mask(24, 4), extra=5)
    with c.decoder():
        handed_over = c.base(prompt, cache=cache, position_ids=torch.arange(start, start + 5).expand(3, -1))
    gist = gist_mask(24, 4, 5)
    x = torch.cat([c.base.embed(context), c.memory[None].expand(3, -1, -1), c.base.embed(prompt)], dim=1)
    one_pass = c.base(inputs_embeds=x, attention_mask=gist.attention_mask,
                      position_ids=gist.position_ids.expand(3, -1))[:, -5:]
    torch.testing.assert_close(handed_over, one_pass, **TOL)


def test_only_lora_and_memory_train_and_the_decoder_is_frozen(context):
    c = compressor(6)
    trainable = {name for name, p in c.named_parameters() if p.requires_grad}
    assert "memory" in trainable and trainable and all("lora_" in n or n == "memory" for n in trainable)
    memory = c.encode(context, pic_mask(24, 8, 4))
    with c.decoder():
        prefix = torch.cat([c.base.embed(torch.zeros(3, 1, dtype=torch.long)), memory], dim=1)
        loss = decoder_loss(c.base, prefix, [[1, 2], [3], [4, 5, 6]], [[7, 8], [9], [10]], pad_id=0)
    loss.backward()
    grads = {name: p.grad for name, p in c.named_parameters() if p.requires_grad}
    assert grads["memory"] is not None and grads["memory"].abs().sum() > 0
    assert all(p.grad is None for p in c.parameters() if not p.requires_grad)
    with c.decoder():  # adapters off: the decoder is the untouched base model
        fresh = tiny_model(0)
        ids = torch.randint(0, 64, (2, 10))
        torch.testing.assert_close(c.base(ids), fresh(ids), **TOL)


def test_decoder_loss_scores_only_the_targets():
    model = tiny_model(1)
    prefix = model.embed(torch.tensor([[0, 5, 6]]))
    loss = decoder_loss(model, prefix, [[7, 8]], [[9, 10]], pad_id=0)
    logits = model(torch.tensor([[0, 5, 6, 7, 8, 9, 10]]))
    expected = torch.nn.functional.cross_entropy(logits[0, 4:6], torch.tensor([9, 10]))
    torch.testing.assert_close(loss, expected, **TOL)


def test_decoder_loss_over_a_padded_batch_is_the_mean_over_all_target_tokens():
    model = tiny_model(1)
    prefix = model.embed(torch.tensor([[0, 5, 6], [0, 11, 12]]))
    prompts, targets = [[7, 8], [13]], [[9, 10], [14, 15, 16]]
    loss = decoder_loss(model, prefix, prompts, targets, pad_id=0)
    token_losses = []
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        ids = [0] + [[5, 6], [11, 12]][row] + prompt + target
        logits = model(torch.tensor([ids]))[0]  # (T, V), unpadded: the reference
        start = 3 + len(prompt) - 1  # the position that predicts the first target token
        token_losses.append(torch.nn.functional.cross_entropy(logits[start:start + len(target)], torch.tensor(target),
                                                              reduction="none"))
    torch.testing.assert_close(loss, torch.cat(token_losses).mean(), **TOL)


def test_greedy_from_embeds_matches_step_by_step_argmax():
    model = tiny_model(2)
    rows = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6])]  # different lengths: left padding
    out = greedy_from_embeds(model, [model.embed(r) for r in rows], 4, stop_ids={63})
    for row, generated in zip(rows, out):
        ids = row.tolist()
        for _ in range(len(generated)):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert generated == ids[len(row):]


def test_decoder_loss_after_memory_keys_values_matches_one_row_at_a_time(context):
    c, layout = compressor(6), pic_mask(24, 8, 4)  # LoRA perturbed: the encoder differs from the decoder
    prompts, targets = [[7, 8], [13], [20, 21, 22]], [[9, 10], [14, 15, 16], [23]]
    memory_kv = c.memory_kv(context, layout)
    caches = [c.memory_cache(context[row:row + 1], layout, extra=8) for row in range(3)]  # adapters on: encoder
    with c.decoder():
        bos = c.base.embed(torch.zeros(3, 1, dtype=torch.long))  # (3, 1, H)
        loss = decoder_loss(c.base, bos, prompts, targets, pad_id=0, memory_kv=memory_kv)
        token_losses = []
        for row, (prompt, target) in enumerate(zip(prompts, targets)):  # the reference: one row, no padding
            ids = torch.tensor([[0] + prompt + target])
            cache, start = caches[row]
            logits = c.base(ids, cache=cache, position_ids=torch.arange(start, start + ids.shape[1])[None])[0]
            first = len(prompt)  # position of the last prompt token (after bos) predicts the first target token
            token_losses.append(torch.nn.functional.cross_entropy(logits[first:first + len(target)],
                                                                  torch.tensor(target), reduction="none"))
    torch.testing.assert_close(loss, torch.cat(token_losses).mean(), **TOL)
    loss.backward()  # gradients reach the encoder through the handed-over keys/values
    assert c.memory.grad is not None and c.memory.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in c.named_parameters() if "lora_" in n)


def test_greedy_after_memory_keys_values_matches_step_by_step_argmax(context):
    c, layout = compressor(6), global_mask(24, 6)
    rows = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6]), torch.tensor([7])]  # left padding after the memory
    memory_kv = c.memory_kv(context, layout)
    with torch.no_grad():
        kv = [c.memory_kv(context[row:row + 1], layout) for row in range(3)]  # adapters on: the encoder
    with c.decoder():
        out = greedy_from_embeds(c.base, [c.base.embed(r) for r in rows], 4, stop_ids={63}, memory_kv=memory_kv)
        for row, (ids, generated) in enumerate(zip(rows, out)):
            ids = ids.tolist()
            for _ in range(len(generated)):
                cache, start = kv_cache_from(c.base, kv[row], len(ids)), kv[row][2]
                positions = torch.arange(start, start + len(ids))[None]
                logits = c.base(torch.tensor([ids]), cache=cache, position_ids=positions)
                ids.append(int(logits[0, -1].argmax()))
            assert generated == ids[len(rows[row]):]


def test_memory_keys_values_must_match_the_rows_and_positions(context):
    c, layout = compressor(6), global_mask(24, 6)
    keys, values, start = c.memory_kv(context, layout)  # 3 rows
    with c.decoder():
        bos = c.base.embed(torch.zeros(2, 1, dtype=torch.long))  # 2 rows
        with pytest.raises(ValueError, match="memory_kv holds 3 rows for 2 prefix rows"):
            decoder_loss(c.base, bos, [[1]] * 2, [[2]] * 2, pad_id=0, memory_kv=(keys, values, start))
        with pytest.raises(ValueError, match="memory_kv holds 3 rows for 2 prefixes"):
            greedy_from_embeds(c.base, list(bos), 2, {63}, memory_kv=(keys, values, start))
        late = ([k[:2] for k in keys], [v[:2] for v in values], 91)  # positions 91..96: 97 > max_seq_len=96
        with pytest.raises(ValueError, match="positions 91..96 exceed max_seq_len=96"):
            decoder_loss(c.base, bos, [[1, 2]] * 2, [[3, 4, 5]] * 2, pad_id=0, memory_kv=late)


def test_compressor_errors(context):
    c = compressor(6)
    with pytest.raises(ValueError, match="layout holds 24 text and 3 memory"):
        c.encode(context, global_mask(24, 3))
    long_context = torch.zeros(1, 96, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the model's max_seq_len=96"):
        Compressor(tiny_model(), 24).encode(long_context, global_mask(96, 24))
    with pytest.raises(ValueError, match="num_memory must be a positive int"):
        Compressor(tiny_model(), 0)
