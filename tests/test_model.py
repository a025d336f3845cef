"""ModelConfig, Transformer and checkpoints: input validation, save/load, loss, padding and the KV cache."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minimoe.model.model_config import ModelConfig
from minimoe.model.transformer import CONFIG_FILE, WEIGHTS_FILE, Transformer, lm_loss

TOL = dict(rtol=1e-5, atol=1e-5)


def make_model(seed=0, **overrides) -> Transformer:
    settings = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                    max_seq_len=32, init_std=0.15)
    settings.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**settings)).eval()


def random_ids(shape, vocab=96, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=64, num_heads=5), "num_heads=5 does not divide hidden_size=64"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3 must be positive and divide num_heads=4"),
    (dict(num_kv_heads=0), "num_kv_heads=0"),
    (dict(vocab_size=0), "vocab_size must be a positive int, got 0"),
    (dict(hidden_size=32.0), "hidden_size must be a positive int, got 32.0"),
    (dict(num_layers=True), "num_layers must be a positive int, got True"),
    (dict(max_seq_len=-1), "max_seq_len must be a positive int, got -1"),
    (dict(head_dim=7), "head_dim must be a positive even number .*got 7"),
    (dict(qk_norm="layer"), "qk_norm must be None, 'head' or 'full', got 'layer'"),
    (dict(rope_scaling={"factor": 8.0}), "rope_scaling is missing"),
    (dict(moe_layers=[0]), r"moe_layers=\[0\] given but moe is None"),
])
def test_bad_configs_name_the_value(overrides, message):
    settings = dict(vocab_size=96, hidden_size=32, num_heads=4)
    settings.update(overrides)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**settings)


def test_config_defaults_follow_meta():
    config = ModelConfig(hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_multiple_of=1024, ffn_dim_multiplier=1.3)
    assert (config.head_dim, config.intermediate_size) == (128, 14336)  # Llama 3 8B
    assert ModelConfig(hidden_size=48, num_heads=3).num_kv_heads == 3


def test_config_json_round_trip_and_strictness(tmp_path):
    config = ModelConfig(hidden_size=32, num_heads=4, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, extra={"tokenizer": "bytes"})
    path = tmp_path / "config.json"
    config.save(path)
    assert ModelConfig.load(path) == config
    data = json.loads(path.read_text())
    path.write_text(json.dumps(dict(data, window=128)))
    with pytest.raises(ValueError, match=r"unknown keys \['window'\], missing keys \[\]"):
        ModelConfig.load(path)
    del data["rms_norm_eps"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config.json: model config: unknown keys \[\], missing keys \['rms_norm_eps'\]"):
        ModelConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ModelConfig.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        ModelConfig.load(path)


# ---- forward validation -----------------------------------------------------------------------------


def test_bad_inputs_name_the_value():
    model = make_model()
    ids = random_ids((2, 5))
    cases = [
        (dict(input_ids=torch.tensor([[1, 96]])), "token id 96 is outside the vocabulary \\[0, 96\\)"),
        (dict(input_ids=torch.tensor([[3, -1]])), "token id -1 is outside the vocabulary"),
        (dict(input_ids=random_ids((1, 33))), "sequence of 33 tokens is longer than max_seq_len=32"),
        (dict(input_ids=ids.float()), r"input_ids must be an integer tensor \(B, T\), got \(2, 5\) torch.float32"),
        (dict(input_ids=ids[0]), r"input_ids must be an integer tensor \(B, T\), got \(5,\)"),
        (dict(input_ids=ids.bool()), "torch.bool"),
        (dict(input_ids=[[1, 2]]), "got list"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), r"input_ids is empty: shape \(2, 0\)"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 4)), r"attention_mask must have shape \(2, 5\).*got \(2, 4\)"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 1, 5, 4, dtype=torch.bool)),
         r"4D attention_mask must have shape \(2, 1, 5, 5\), got \(2, 1, 5, 4\)"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 5, 5)), "must be 2D .* or 4D .*, got 3D"),
        (dict(input_ids=ids, attention_mask=torch.full((2, 5), 2)), "only 0 .padding. and 1"),
        (dict(inputs_embeds=torch.randn(2, 5, 31)), r"inputs_embeds must be a float tensor \(B, T, 32\), got \(2, 5, 31\)"),
        (dict(inputs_embeds=torch.randn(5, 32)), r"got \(5, 32\)"),
        (dict(input_ids=ids, inputs_embeds=torch.randn(2, 5, 32)), "exactly one of input_ids and inputs_embeds"),
        (dict(), "exactly one of input_ids and inputs_embeds"),
        (dict(input_ids=ids, position_ids=torch.arange(5)), r"position_ids must be an integer tensor of shape \(2, 5\)"),
        (dict(input_ids=ids, position_ids=torch.zeros(2, 5)), "torch.float32"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**kwargs)


def test_cache_misuse_is_rejected():
    model = make_model()
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="the cache was made for batch size 2, got a batch of 3"):
        model(random_ids((3, 4)), cache=cache)
    model(random_ids((2, 6)), cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 8 tokens; 9 were requested"):
        model(random_ids((2, 3)), cache=cache)
    long_cache = model.new_cache(1, 64)
    model(random_ids((1, 30)), cache=long_cache)
    with pytest.raises(ValueError, match="sequence of 33 tokens is longer than max_seq_len=32"):
        model(random_ids((1, 3)), cache=long_cache)


# ---- cache, padding, last_only ------------------------------------------------------------------------


def test_cache_decoding_and_last_only_equal_the_full_forward():
    model = make_model()
    ids = random_ids((3, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 10)
        pieces = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 10)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)
        torch.testing.assert_close(model(ids, last_only=True), full[:, -1:], **TOL)


def test_left_padding_equals_unpadded_sequences_with_gradients():
    """A left-padded batch gives each sequence the logits and the loss gradients it has alone (no padding)."""
    model, reference = make_model().train(), make_model().train()
    lengths, width = (9, 5, 2), 9
    ids = random_ids((3, width))
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(3), mask.argmax(-1)] = -100  # nothing is predicted from padding
    logits = model(ids, attention_mask=mask, position_ids=positions)
    lm_loss(logits, labels).backward()
    total, count = 0.0, 0
    for row, n in enumerate(lengths):
        alone = reference(ids[row:row + 1, width - n:])
        torch.testing.assert_close(logits[row, width - n:], alone[0], **TOL)
        total = total + F.cross_entropy(alone[0, :-1], ids[row, width - n + 1:], reduction="sum")
        count += n - 1
    (total / count).backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_predicted_from_padding_keeps_gradients_bounded():
    """Predicting the first real token from the last padding position is legal; its gradient must stay finite
    and of ordinary size (an empty attention row used to make it explode)."""
    model = make_model().train()
    ids = random_ids((2, 8))
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [1] * 8])
    lm_loss(model(ids, attention_mask=mask), ids.masked_fill(mask == 0, -100)).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grads).all() and grads.abs().max() < 10


# ---- loss -----------------------------------------------------------------------------------------


def test_lm_loss_equals_brute_force():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    labels[0, 2], labels[1, 5], labels[1, 0] = -100, -100, -100
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b in range(2) for t in range(5)
             if labels[b, t + 1] != -100]
    torch.testing.assert_close(lm_loss(logits, labels), torch.stack(terms).mean(), **TOL)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 6\), got \(2, 5\)"):
        lm_loss(logits, labels[:, :5])
    for bad in (11, -5):
        with pytest.raises(ValueError, match=rf"label {bad} is invalid: labels must be in \[0, 11\) or -100"):
            lm_loss(logits, labels.index_put((torch.tensor([0]), torch.tensor([3])), torch.tensor(bad)))


# ---- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_gives_identical_logits(tmp_path, tied):
    model = make_model(tie_word_embeddings=tied, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model.save(tmp_path / "ckpt")
    loaded = Transformer.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert ("lm_head.weight" in load_file(str(tmp_path / "ckpt" / WEIGHTS_FILE))) == (not tied)
    assert (loaded.lm_head.weight is loaded.embed.weight) == tied
    weights, config = (tmp_path / "ckpt" / WEIGHTS_FILE).stat(), (tmp_path / "ckpt" / "config.json").stat()
    assert weights.st_mode & 0o777 == config.st_mode & 0o777  # the weights as readable as the config beside them
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    ids = random_ids((2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    as_bf16 = Transformer.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert as_bf16.embed.weight.dtype == torch.bfloat16


def test_checkpoint_not_matching_its_config_is_rejected(tmp_path):
    model = make_model()
    model.save(tmp_path)
    path = str(tmp_path / WEIGHTS_FILE)
    tensors = load_file(path)

    def rewrite(state, message):
        save_file(state, path)
        with pytest.raises(ValueError, match=message):
            Transformer.load(tmp_path)

    rewrite({k: v for k, v in tensors.items() if k != "norm.weight"}, "does not match config.json: missing norm.weight")
    rewrite(dict(tensors, **{"layers.2.attn_norm.weight": torch.ones(32)}), "unexpected layers.2.attn_norm.weight")
    rewrite(dict(tensors, **{"embed.weight": torch.zeros(97, 32)}),
            r"embed.weight: shape \(97, 32\) in the file, \(96, 32\) in the config")
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        Transformer.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"vocab_size": 96}))
    save_file(tensors, path)
    with pytest.raises(ValueError, match="missing keys .*'hidden_size'"):
        Transformer.load(tmp_path)


def test_saving_a_tied_config_whose_head_was_replaced_is_refused(tmp_path):
    model = make_model(tie_word_embeddings=True)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.embed.weight))  # the config now lies
    with pytest.raises(ValueError, match="lm_head.weight is not embed.weight"):
        model.save(tmp_path / "ckpt")
