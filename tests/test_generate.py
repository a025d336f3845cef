"""Generation: greedy equals transformers' generate(do_sample=False); sampling is seeded and does what it says."""

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from minimoe.model.generate import generate, sample_next
from minimoe.hf import to_hf
from minimoe.model import ModelConfig, Transformer
from batches import left_padded

LLAMA31_SMALL = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def make_model(seed=0, **overrides) -> Transformer:
    settings = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                    max_seq_len=48, init_std=0.3, rope_scaling=LLAMA31_SMALL)
    settings.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**settings)).eval()


def prompts(lengths=(7, 4, 1), vocab=64, seed=1):
    """Left-padded prompts (pad id 0) and their attention mask."""
    return left_padded(lengths, vocab, seed, low=1)


def hf_greedy(hf_model, ids, mask, max_new_tokens, eos_token_id=None, pad_token_id=0):
    return hf_model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_equals_transformers_without_padding(tied):
    model = make_model(tie_word_embeddings=tied)
    hf_model = to_hf(model, attn_implementation="eager").eval()
    ids, mask = prompts(lengths=(6, 6))
    ours = generate(model, ids, 20)
    theirs = hf_greedy(hf_model, ids, mask, 20)
    assert ours.shape == (2, 26)
    assert torch.equal(ours, theirs)
    assert len(set(ours[:, 6:].flatten().tolist())) > 3  # a real continuation, not one repeated token


def test_greedy_equals_transformers_with_left_padding():
    model = make_model()
    hf_model = to_hf(model, attn_implementation="eager").eval()
    ids, mask = prompts()
    ours = generate(model, ids, 25, attention_mask=mask)
    assert torch.equal(ours, hf_greedy(hf_model, ids, mask, 25))
    # each row equals its prompt generated alone, without padding
    for row, n in enumerate(mask.sum(-1).tolist()):
        alone = generate(model, ids[row:row + 1, ids.shape[1] - n:], 25)
        assert torch.equal(ours[row, ids.shape[1] - n:], alone[0])


def test_greedy_with_eos_equals_transformers():
    model = make_model()
    hf_model = to_hf(model, attn_implementation="eager").eval()
    ids, mask = prompts()
    free = generate(model, ids, 20, attention_mask=mask)
    eos = int(free[1, ids.shape[1] + 3])  # a token row 1 emits at its 4th step: it stops there
    ours = generate(model, ids, 20, attention_mask=mask, eos_token_id=eos, pad_token_id=63)
    theirs = hf_greedy(hf_model, ids, mask, 20, eos_token_id=eos, pad_token_id=63)
    assert torch.equal(ours, theirs)
    finished_at = (ours[1, ids.shape[1]:] == eos).nonzero()[0].item()
    assert finished_at <= 3 and (ours[1, ids.shape[1] + finished_at + 1:] == 63).all()
    # once every row has finished, generation stops: row 0 alone, eos = its first new token
    stopped = generate(model, ids[:1], 20, attention_mask=mask[:1], eos_token_id=int(free[0, ids.shape[1]]))
    assert torch.equal(stopped, free[:1, :ids.shape[1] + 1])


def test_sampling_is_reproducible_with_a_generator():
    model = make_model()
    ids, mask = prompts()

    def sample(seed, **kwargs):
        return generate(model, ids, 15, attention_mask=mask, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(sample(0), sample(0))
    assert torch.equal(sample(5, top_p=0.8), sample(5, top_p=0.8))
    assert not torch.equal(sample(0), sample(1))
    greedy = generate(model, ids, 15, attention_mask=mask)
    assert torch.equal(sample(0, top_p=1e-6), greedy)  # a tiny nucleus holds only the most likely token
    assert torch.equal(generate(model, ids, 15, attention_mask=mask, temperature=1e-4,
                                generator=torch.Generator().manual_seed(0)), greedy)


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.95])
def test_nucleus_equals_transformers_top_p_warper(top_p):
    """The kept set equals transformers' TopPLogitsWarper, and samples follow the renormalised probabilities."""
    generator = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(4, 20, generator=generator)
    kept = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))  # (4, 20)
    samples = torch.stack([sample_next(logits, 1.0, top_p, generator) for _ in range(3000)])  # (3000, 4)
    for row in range(4):
        counts = torch.bincount(samples[:, row], minlength=20).float()
        assert set(counts.nonzero().flatten().tolist()) <= set(kept[row].nonzero().flatten().tolist())
        expected = torch.softmax(logits[row], -1) * kept[row]
        expected /= expected.sum()
        assert (counts / 3000 - expected).abs().max() < 0.04


def test_temperature_scales_the_distribution():
    generator = torch.Generator().manual_seed(3)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (0.5, 2.0):
        samples = torch.cat([sample_next(logits, temperature, 1.0, generator) for _ in range(4000)])
        frequency = torch.bincount(samples, minlength=4).float() / 4000
        assert (frequency - torch.softmax(logits[0] / temperature, -1)).abs().max() < 0.03
    assert torch.equal(sample_next(torch.tensor([[0.1, 3.0, 0.2]])), torch.tensor([1]))


def test_bad_arguments_name_the_value():
    model = make_model()
    ids, mask = prompts()
    with pytest.raises(ValueError, match=r"prompt \(7\) \+ max_new_tokens \(42\) = 49 tokens exceeds max_seq_len=48"):
        generate(model, ids, 42, attention_mask=mask)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match=f"max_new_tokens must be a whole number >= 0, got {bad}"):
            generate(model, ids, bad)
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\), got shape \(7,\)"):
        generate(model, ids[0], 3)
    for shape in ((ids.shape[0], 3), (ids.shape[0] + 1, ids.shape[1])):  # a mask for other prompts
        with pytest.raises(ValueError, match=rf"attention_mask must have input_ids' shape \({ids.shape[0]}, 7\)"):
            generate(model, ids, 3, attention_mask=torch.ones(shape, dtype=torch.long))
    right = torch.ones_like(ids)
    right[0, -2:] = 0  # right padding: generation would continue after the padding
    with pytest.raises(ValueError, match="attention_mask must be 0 for left padding then 1 for every prompt token"):
        generate(model, ids, 3, attention_mask=right)
    for temperature in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"need a finite temperature >= 0 .* got temperature={temperature}"):
            generate(model, ids, 3, temperature=temperature)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"top_p={top_p}"):
            sample_next(torch.zeros(1, 4), 1.0, top_p)
    with pytest.raises(ValueError, match="token id 64 is outside the vocabulary"):
        generate(model, torch.tensor([[1, 64]]), 3)
    assert torch.equal(generate(model, ids, 0, attention_mask=mask), ids)
