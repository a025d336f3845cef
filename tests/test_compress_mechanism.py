"""The mechanism experiment's parts: masks and positions, data, the teacher-forced identity, statistics, the run."""

import json

import numpy as np
import pytest
import torch

from minimoe.compress import Compressor
from minimoe.compress.experiment import main
from minimoe.compress.experiment_config import PRESETS, ExperimentConfig
from minimoe.compress.masks import MEMORY, TEXT, build_layout, global_mask, pic_mask
from minimoe.compress.mechanism import (all_pilot_settings, choose_read_path_and_lr, grid_settings,
                                       run_mechanism)
from minimoe.compress.mechanism_data import MechanismSet, Rows, training_batch, value_mask
from minimoe.compress.mechanism_report import markdown
from minimoe.compress.mechanism_stats import (gains_at, hypotheses, paired_bootstrap, smoothed, steps_to)
from minimoe.compress.mechanism_training import (compile_blocks, greedy_answers, read, read_both, teacher_forced,
                                                train_step)
from minimoe.compress.qa_data import FIRST_NAMES, LAST_NAMES, generate_documents, repeat_prompt
from minimoe.data.tokenizer import train_tokenizer
from minimoe.model import ModelConfig, Transformer

COUNT = lambda s: [0] * (len(s) // 4)  # noqa: E731  (a stand-in tokenizer: length only)


# ---- masks and positions -------------------------------------------------------------------------------
def test_spread_positions_put_memory_over_the_text_it_would_summarise():
    layout = global_mask(16, 4, positions="spread")
    assert layout.position_ids[0, 16:].tolist() == [3, 7, 11, 15]  # floor((j + 1) n / k) - 1
    assert layout.position_ids[0, :16].tolist() == list(range(16))
    assert torch.equal(layout.attention_mask, global_mask(16, 4).attention_mask)  # the mask does not change
    assert global_mask(12, 5, positions="spread").position_ids[0, 12:].tolist() == [1, 3, 6, 8, 11]
    with pytest.raises(ValueError, match="positions must be one of"):
        global_mask(16, 4, positions="restart")


def test_text_attention_across_chunks_is_an_explicit_option():
    local, across = pic_mask(16, 8, 4, positions="continue"), pic_mask(16, 8, 4, text_sees="all")
    text = local.slots(TEXT)
    assert not local.attention_mask[0, 0][text[8:]][:, text[:8]].any()  # chunk 1's text never reads chunk 0's
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.equal(across.attention_mask[0, 0][text][:, text], causal)  # text reads all earlier text
    memory = local.slots(MEMORY)  # memory stays chunk-local either way
    assert torch.equal(local.attention_mask[0, 0][memory], across.attention_mask[0, 0][memory])
    with pytest.raises(ValueError, match='text_sees="all" needs positions="continue"'):
        pic_mask(16, 8, 4, positions="restart", text_sees="all")
    with pytest.raises(ValueError, match="only the positions option"):
        build_layout("global", 16, 4, text_sees="all")


def test_restart_positions_make_every_chunk_look_alike():
    layout = pic_mask(16, 8, 4, positions="restart")
    positions, memory = layout.position_ids[0], layout.slots(MEMORY)
    assert positions[memory].tolist() == [8, 9, 8, 9]  # each chunk's memory right after its own 8 tokens
    assert positions[layout.slots(TEXT)].tolist() == list(range(8)) * 2


# ---- data ------------------------------------------------------------------------------------------------
def test_distinct_names_give_every_person_their_own_first_name_and_surname():
    for doc in generate_documents("train", 20, 3, COUNT, 256, 64, distinct_names=True):
        firsts, lasts = zip(*(name.split() for name in doc.people))
        assert len(set(firsts)) == len(set(lasts)) == len(doc.people) == 4
        assert all(f in FIRST_NAMES["train"] and s in LAST_NAMES["train"] for f, s in zip(firsts, lasts))
        for j, paragraph in enumerate(doc.paragraphs):
            assert doc.people[j] in paragraph and all(v in paragraph for v in doc.values[j])
        for q in doc.questions:
            assert q.answer in doc.values[q.paragraph] and q.attribute
    shared = generate_documents("train", 20, 3, COUNT, 256, 64)  # the default keeps shared names
    assert any(len({n.split()[1] for n in d.people}) < 4 for d in shared)


@pytest.fixture(scope="module")
def tokenizer():
    docs = generate_documents("train", 40, 9, COUNT, 256, 64, distinct_names=True)
    return train_tokenizer([d.text() for d in docs], vocab_size=500)


def test_value_mask_marks_exactly_the_tokens_of_the_stated_values(tokenizer):
    doc = generate_documents("dev", 1, 0, lambda s: tokenizer.encode(s).ids, 256, 64, distinct_names=True)[0]
    ids, flags = value_mask(tokenizer, doc.paragraphs[0], doc.values[0])
    encoding = tokenizer.encode(doc.paragraphs[0], add_special_tokens=False)
    assert ids == encoding.ids and len(flags) == len(ids) and any(flags) and not all(flags)
    marked = "".join(doc.paragraphs[0][a:b] for (a, b), f in zip(encoding.offsets, flags) if f)
    for value in doc.values[0]:
        assert value.replace(" ", "") in marked.replace(" ", "")
    with pytest.raises(ValueError, match="is not stated"):
        value_mask(tokenizer, "Ada lives in Rome.", ("Paris",))


def test_the_training_stream_is_a_pure_function_of_seed_and_step(tokenizer):
    cfg = ExperimentConfig(**PRESETS["cpu-mech"])
    a = training_batch(0, 5, cfg, tokenizer, 0, 1)
    b = training_batch(0, 5, cfg, tokenizer, 0, 1)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]  # both arms of a seed: identical batches
    assert not torch.equal(a[0], training_batch(0, 6, cfg, tokenizer, 0, 1)[0])  # fresh documents every step
    assert not torch.equal(a[0], training_batch(1, 5, cfg, tokenizer, 0, 1)[0])
    contexts, questions, repeats = a
    assert contexts.shape == (cfg.batch_size, cfg.context_tokens)
    assert len(repeats.doc) == cfg.batch_size * cfg.ae_rows_per_context
    assert all(t[-1] == 1 for t in repeats.targets) and all(len(v) == len(t) for v, t in zip(repeats.values,
                                                                                             repeats.targets))
    assert "Repeat the paragraph about" in tokenizer.decode(repeats.prompts[0])


# ---- the teacher-forced identity, on a tiny model -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=12, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_seq_len=128, tie_word_embeddings=True)
    compressor = Compressor(Transformer(config).eval(), 4, lora_rank=2, seed=0).eval()
    for name, parameter in compressor.named_parameters():  # LoRA B starts at zero: perturb it
        if "lora_B" in name:
            parameter.data.normal_(0, 0.3)
    return compressor


def _rows(generator, contexts, per_context, prompt, target, vocab):
    ids = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    count = contexts * per_context
    return Rows([i // per_context for i in range(count)], [ids(prompt) for _ in range(count)],
                [ids(target) for _ in range(count)], [[True] * target for _ in range(count)])


def test_teacher_forced_answer_em_equals_greedy_token_exact_match(tiny):
    generator, stops = torch.Generator().manual_seed(1), {1, 2, 3}
    contexts = torch.randint(3, 12, (6, 16), generator=generator)
    layout = global_mask(16, 4)
    probe = _rows(generator, 6, 4, 3, 1, 12)  # prompts; targets filled in below
    data = MechanismSet(contexts, probe, _rows(generator, 6, 1, 2, 3, 12), ["x"] * 24, [0] * 24, [set()] * 24)
    generated = greedy_answers(tiny, layout, data, 0, stops, lambda ids: ids, max_new_tokens=6)
    memory_kv = tiny.memory_kv(contexts, layout)
    emitted = []  # what greedy wrote, with the stop token it ended on (None: it never stopped)
    for i, ids in enumerate(generated):
        logits, _, _ = read(tiny, memory_kv, Rows([probe.doc[i]], [probe.prompts[i]], [ids + [1]]), 0, 0)
        stop = int(logits[-1].argmax())
        emitted.append(ids + [stop] if stop in stops and len(ids) < 6 else None)
        probe.targets[i] = ids + [stop]  # the gold answer: exactly what greedy wrote, then the stop it chose
    assert sum(e is not None for e in emitted) >= 8, "too few rows stopped to test the identity"
    for i in range(0, 24, 3):  # corrupt some gold answers: their first token is no longer the greedy one
        probe.targets[i] = [(probe.targets[i][0] - 2) % 9 + 3] + probe.targets[i][1:]
    right = teacher_forced(tiny, layout, data, 0, 0)["em"] / 100 * 24
    logits, labels, row = read(tiny, memory_kv, probe, 0, 0)
    per_row = (torch.zeros(24).index_add_(0, row, (logits.argmax(-1) != labels).float()) == 0).tolist()
    greedy_exact = [e == t for e, t in zip(emitted, probe.targets)]  # greedy wrote the gold tokens, then its stop
    fits = [len(ids) < 6 for ids in generated]  # the identity needs answers that fit max_new_tokens
    assert [a for a, f in zip(per_row, fits) if f] == [b for b, f in zip(greedy_exact, fits) if f]
    assert 0 < sum(greedy_exact) < sum(fits) and round(right) == sum(per_row)


def test_one_decoder_pass_over_questions_and_repeats_equals_two(tiny):
    generator = torch.Generator().manual_seed(4)
    contexts = torch.randint(3, 12, (3, 16), generator=generator)
    memory_kv = tiny.memory_kv(contexts, pic_mask(16, 8, 4, positions="restart"))
    questions, repeats = _rows(generator, 3, 2, 3, 1, 12), _rows(generator, 3, 1, 2, 6, 12)  # repeats longer
    merged = read_both(tiny, memory_kv, questions, repeats, 0, 0)
    for alone, together in zip((read(tiny, memory_kv, questions, 0, 0), read(tiny, memory_kv, repeats, 0, 0)), merged):
        assert torch.allclose(alone[0], together[0], atol=1e-5) and torch.equal(alone[1], together[1])
        assert torch.equal(alone[2], together[2])  # rows numbered within their own kind


def test_a_training_step_reaches_lora_memory_and_the_decoder_lora(tiny):
    torch.manual_seed(0)
    compressor = Compressor(Transformer(tiny.base.config).eval(), 4, lora_rank=2, reader_lora=True)
    generator = torch.Generator().manual_seed(2)
    trainable = {n: p for n, p in compressor.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    train_step(compressor, optimizer, pic_mask(16, 8, 4, positions="restart"), torch.randint(3, 12, (2, 16),
               generator=generator), _rows(generator, 2, 2, 3, 2, 12), _rows(generator, 2, 1, 2, 4, 12), 0, 0)
    changed = {n for n, p in trainable.items() if not torch.equal(p, before[n])}
    assert "memory" in changed and any(n.startswith("reader") and "lora" in n for n in changed)
    assert any(n.startswith("peft.") and "lora" in n for n in changed)
    with compressor.decoder() as decoder:
        assert decoder is compressor.reader
    with tiny.decoder() as decoder:  # without a reader LoRA the decoder is the base with adapters off
        assert decoder is tiny.base


def _train_two_steps(config, backend):
    """Two training steps of a fresh compressor (decoder LoRA on, repeats of two lengths), its blocks compiled with
    ``backend`` or eager (None): the losses and every trainable parameter afterwards."""
    torch.manual_seed(0)
    compressor = Compressor(Transformer(config).eval(), 4, lora_rank=2, reader_lora=True)
    if backend is not None:
        compile_blocks(compressor, backend)
    optimizer = torch.optim.AdamW([p for p in compressor.parameters() if p.requires_grad], lr=1e-2)
    generator, layout, losses = torch.Generator().manual_seed(2), pic_mask(16, 8, 4, positions="restart"), []
    for target in (4, 7):  # the decoder's length changes between steps, as it does in training
        contexts = torch.randint(3, 12, (2, 16), generator=generator)
        questions, repeats = _rows(generator, 2, 2, 3, 2, 12), _rows(generator, 2, 1, 2, target, 12)
        losses += [float(x) for x in train_step(compressor, optimizer, layout, contexts, questions, repeats, 0, 0)]
    return losses, {n: p.detach().clone() for n, p in compressor.named_parameters() if p.requires_grad}


def test_compiled_blocks_trace_to_the_eager_step_and_share_one_graph(tiny):
    import torch._dynamo

    torch._dynamo.reset()
    config = ModelConfig(**{**vars(tiny.base.config), "num_layers": 4})
    eager_losses, eager = _train_two_steps(config, None)
    torch._dynamo.utils.counters.clear()
    compiled_losses, compiled = _train_two_steps(config, "aot_eager")  # the traced graphs, run op by op
    assert compiled_losses == eager_losses
    # AOT autograd sums a few gradients in another order; Adam's first steps (lr 1e-2 times g / |g|) magnify that
    # rounding in gradients near zero to at most a hundredth of a step
    assert all(torch.allclose(compiled[n], eager[n], rtol=0, atol=1e-4) for n in eager)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs < 4 * 4, f"{graphs} graphs for 4 blocks x (encoder, decoder): the blocks do not share one"
    torch._dynamo.reset()


def test_blocks_compiled_to_kernels_match_eager_to_rounding(tiny):
    import torch._dynamo

    torch._dynamo.reset()
    config = ModelConfig(**{**vars(tiny.base.config), "num_layers": 1})
    eager_losses, eager = _train_two_steps(config, None)
    compiled_losses, compiled = _train_two_steps(config, "inductor")  # generated kernels (C++ on the CPU)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert all(torch.allclose(compiled[n], eager[n], atol=1e-4) for n in eager)
    torch._dynamo.reset()


# ---- statistics ---------------------------------------------------------------------------------------------
def test_smoothing_and_steps_to_target_by_hand():
    assert smoothed([0, 3, 6, 9]) == [0, 1.5, 3, 6]
    curve = [{"step": s, "em": v} for s, v in ((25, 0), (50, 30), (75, 60), (100, 90))]
    assert steps_to(curve, "em", 30) == 75 and steps_to(curve, "em", 30, smooth=False) == 50
    assert steps_to(curve, "em", 95) is None


def test_paired_bootstrap_brackets_the_gain_and_is_zero_for_identical_arms():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 400)
    assert paired_bootstrap(base, base) == (0.0, 0.0)
    low, high = paired_bootstrap(base * 1.2, base)
    assert low == pytest.approx(20.0) and high == pytest.approx(20.0)  # a constant ratio has no spread
    noisy = base + rng.normal(0.05, 0.05, 400)
    low, high = paired_bootstrap(noisy, base)
    gain = 100 * (noisy.sum() - base.sum()) / base.sum()
    assert low < gain < high and low > 0


def _run(method, ratio, seed, em_curve, value_curve, f1):
    steps = [25 * (i + 1) for i in range(len(em_curve))]
    return {"method": method, "ratio": ratio, "seed": seed,
            "curve": [{"step": s, "em": e, "value_accuracy": v} for s, e, v in zip(steps, em_curve, value_curve)],
            "test": {"f1": 100 * float(np.mean(f1)), "em": 100 * float(np.mean(f1))},
            "questions": {"doc": list(range(len(f1))), "f1": list(f1), "em": list(f1)}}


def test_hypotheses_are_judged_from_the_curves_and_scores():
    slow, fast = [10, 20, 30, 40, 50, 60, 70, 80], [40, 60, 80, 80, 80, 80, 80, 80]
    runs = []
    for seed in range(3):
        for ratio, lift in ((4, 0.0), (16, 0.1), (64, 0.2)):
            runs.append(_run("global", ratio, seed, slow, slow, [0.5] * 20))
            runs.append(_run("pic", ratio, seed, fast, fast, [0.5 + lift + 0.01 * (i % 3) for i in range(20)]))
    gains = [gains_at(runs, r) for r in (4, 16, 64)]
    h = hypotheses(runs, [4, 16, 64], gains)
    assert h["H1"]["held"] and h["H2"]["held"] and h["H3"]["held"]
    first = h["H3"]["per_seed"][0]  # global's smoothed peak 70 at step 200; PIC's smoothed 40, 50, 60, 73
    assert first["global_steps"] == 200 and first["pic_steps"] == 100
    assert h["H2"]["f1_gains"][0] == pytest.approx(100 * (19 / 20 * 0.01) / 0.5) and h["H2"]["top_ci"][0] > 0
    runs = [r if r["method"] == "global" else {**r, "curve": [{**p, "em": 0, "value_accuracy": 0} for p in r["curve"]]}
            for r in runs]  # PIC that never learns: H1 and H3 missed, "never" counted as infinitely slow
    h = hypotheses(runs, [4, 16, 64], gains)
    assert not h["H1"]["held"] and not h["H3"]["held"] and h["H3"]["per_seed"][0]["pic_steps"] is None
    cut = [r for r in runs if not (r["method"] == "pic" and r["ratio"] == 64)]  # a run cut short: no PIC at 64x
    h = hypotheses(cut, [4, 16, 64], [gains_at(cut, r) for r in (4, 16)], seeds=3)
    assert h["H1"]["held"] is None and h["H1"]["missing"] == 3 and h["H2"]["held"] is None
    assert h["H3"]["held"] is False and h["H3"]["missing"] == 0  # 16x finished: H3 is still judged


# ---- the whole protocol at smoke size --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("mech")
    cfg = ExperimentConfig(**{**PRESETS["cpu-mech"], "corpus_chars": 5_000, "seeds": (0,), "controls": True})
    return cfg, out, run_mechanism(cfg, out, workers=1, progress=False)


def test_the_protocol_runs_pilot_then_grid_and_controls(smoke):
    cfg, out, summary = smoke
    names = sorted(p.stem for p in (out / "runs").glob("*.json"))
    protocol = json.loads((out / "protocol.json").read_text())
    pilot = protocol["pilot"]
    expected = [s["name"] for s in all_pilot_settings(cfg) + grid_settings(cfg, pilot["lr"], pilot["both_near_floor"])]
    assert names == sorted(expected)
    assert set(pilot["best_dev_em"]) == set(pilot["reader_lora_best_dev_em"]) == {f"{x:g}" for x in cfg.pilot_lrs}
    assert protocol["pilot"]["lr"] in cfg.pilot_lrs and "gate" in protocol
    for row in summary["table"]:
        assert row["seeds"] == 1 and len(row["f1_by_paragraph"]) == 2 and len(row["curve"]) == cfg.steps
    run = next(r for r in summary["runs"] if r["method"] == "pic")
    assert len(run["questions"]["f1"]) == run["test"]["count"] == 8  # 4 test documents x 2 questions
    assert {(r["method"], r["ratio"]) for r in summary["runs"]} >= {("pic-continue", 16), ("global-spread", 16)}


def _pilot(em: dict) -> list[dict]:  # (method, lr, reader_lora) -> a one-point dev curve
    return [{"method": m, "lr": lr, "reader_lora": lora, "curve": [{"step": 1, "em": v}]}
            for (m, lr, lora), v in em.items()]


def test_the_pilot_changes_the_read_path_only_when_both_arms_stay_on_the_floor():
    cfg = ExperimentConfig(**{**PRESETS["cpu-mech"], "pilot_lrs": (1e-4, 1e-3)})
    floor = {("global", 1e-4, False): 3.0, ("pic", 1e-4, False): 4.0, ("global", 1e-3, False): 2.0,
             ("pic", 1e-3, False): 9.0, ("global", 1e-4, True): 20.0, ("pic", 1e-4, True): 5.0,
             ("global", 1e-3, True): 30.0, ("pic", 1e-3, True): 40.0}
    chosen = choose_read_path_and_lr(cfg, _pilot(floor), near_floor=10.0)
    assert chosen["both_near_floor"] and chosen["lr"] == 1e-3  # global's best with the decoder LoRA
    assert chosen["best_dev_em"]["0.001"] == {"global": 2.0, "pic": 9.0}
    lifted = {**floor, ("pic", 1e-3, False): 11.0}  # one arm leaves the floor at one rate: the path stays
    chosen = choose_read_path_and_lr(cfg, _pilot(lifted), near_floor=10.0)
    assert not chosen["both_near_floor"] and chosen["lr"] == 1e-4  # by global alone, on the memory-alone path
    tie = {**lifted, ("global", 1e-3, False): 3.0}
    assert choose_read_path_and_lr(cfg, _pilot(tie), near_floor=10.0)["lr"] == 1e-4  # ties: the lower rate


def test_a_smoke_run_says_its_numbers_mean_nothing_and_judges_nothing(smoke):
    _, out, _ = smoke
    text = (out / "results.md").read_text()
    assert text.startswith("**Smoke run: these numbers mean nothing.**")
    assert text.count("not judged (smoke run)") == 5  # the gate, H1-H3 and the gap target
    assert ": held" not in text and ": missed" not in text


@pytest.mark.parametrize("both_near_floor, band_above_floor, says", [
    (True, 5.0, "Both arms stayed there on the memory-alone path at every rate, so the decoder got a LoRA too"),
    (False, 5.0, "An arm on the memory-alone path came off it at some rate, so the decoder stays frozen"),
    (False, 0.0, "The reader's dev bounds leave no band (no score can be below the no-context one)"),
])
def test_the_report_says_why_the_read_path_was_chosen(smoke, both_near_floor, band_above_floor, says):
    _, out, _ = smoke
    summary = json.loads((out / "summary.json").read_text())
    floor = summary["reader"]["dev_teacher_forced"]["none"]["em"]
    summary["protocol"]["pilot"].update(both_near_floor=both_near_floor, near_floor_below=floor + band_above_floor)
    text = markdown(summary)
    assert f"Near the floor means below {floor + band_above_floor:.1f} dev EM. {says}" in text


@pytest.mark.parametrize("overrides, message", [
    ({"handoff": "embeddings"}, "reads memory as keys/values"),
    ({"chunk_size": 96, "context_tokens": 96, "block_tokens": 48}, "one chunk per paragraph"),
    ({"pilot_ratio": 8}, r"^--ratios must include 8: the pilot picks the learning rate at that ratio, and the grid "
                         r"must have it too; got \[4, 16\]$"),
    ({"pilot_seed": 0}, r"^--seeds must leave out 0: the pilot's own seed, outside the grid's; got \[0, 1\]$"),
    ({"ae_rows_per_context": 3}, "ae_rows_per_context must be 1 .. 2"),
    ({"design": "other"}, "design must be one of"),
])
def test_mechanism_config_refuses_what_the_design_cannot_mean(overrides, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**{**PRESETS["cpu-mech"], **overrides})


def test_ratios_without_the_pilots_say_which_ratio_they_must_include():
    with pytest.raises(ValueError, match=r"^--ratios must include 16: the pilot picks the learning rate at that "
                                         r"ratio, and the grid must have it too; got \[3\]$"):
        main(["--preset", "cpu-mech", "--ratios", "3"])


def test_repeat_prompt_names_the_person():
    doc = generate_documents("dev", 1, 0, COUNT, 128, 64, distinct_names=True)[0]
    assert repeat_prompt(doc, 1) == f"\nRepeat the paragraph about {doc.people[1]}:\n"


def test_lr_on_the_command_line_fixes_the_pilot_to_that_rate(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("minimoe.compress.mechanism.run_mechanism",
                        lambda cfg, out, workers, progress: seen.setdefault("cfg", cfg) and {"ok": 1})
    (tmp_path / "results.md").write_text("done\n")
    assert main(["--preset", "cpu-mech", "--lr", "5e-4", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].pilot_lrs == (5e-4,)


def test_a_run_cut_short_is_reported_over_the_settings_that_finished(smoke, tmp_path, capsys, monkeypatch):
    import shutil

    cfg, out, _ = smoke
    shutil.copytree(out, tmp_path / "cut")
    cut = tmp_path / "cut"
    (cut / "runs" / "grid_pic_16x_seed0.json").unlink()
    config = ["--preset", "cpu-mech", "--seeds", "0", "--out", str(cut), "--report-only"]
    with pytest.raises(ValueError, match=r"holds a run made with other settings \(corpus_chars: 5000 there, 20000 "
                                         r"now; set by --preset\)"):
        main(config)  # the smoke run's corpus is smaller than the preset's: not this configuration's run
    monkeypatch.setitem(PRESETS, "cpu-mech", {**PRESETS["cpu-mech"], "corpus_chars": 5_000})
    assert main(config) == 0
    text = capsys.readouterr().out
    assert "**Cut short: 1 grid setting(s) did not finish;**" in text and "| global | 16x |" in text
    with pytest.raises(ValueError, match="the pilot has not finished"):
        main(["--preset", "cpu-mech", "--out", str(tmp_path / "empty"), "--report-only"])


def test_a_finished_run_resumes_without_training_and_other_settings_are_refused(smoke, tmp_path, monkeypatch):
    import shutil

    cfg, out, summary = smoke
    shutil.copytree(out, tmp_path / "again")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished setting was trained again")

    monkeypatch.setattr("minimoe.compress.mechanism.run_setting", no_training)
    again = run_mechanism(cfg, tmp_path / "again", workers=1, progress=False)
    assert again["table"] == summary["table"]
    other = ExperimentConfig(**{**cfg.__dict__, "steps": 5, "compile": True})
    with pytest.raises(ValueError, match=r"holds a run made with other settings \(steps: 3 there, 5 now; set by "
                                         r"--steps\); pass another --out, or that run's settings to resume it$"):
        run_mechanism(other, tmp_path / "again", workers=1, progress=False)


def test_the_gpu_preset_compiles_its_blocks_unless_told_not_to(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("minimoe.compress.mechanism.run_mechanism",
                        lambda cfg, out, workers, progress: seen.append(cfg) or {"ok": 1})
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the preset's device; nothing runs on it here
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    (tmp_path / "results.md").write_text("done\n")
    for flags in ([], ["--no-compile"]):
        assert main(["--preset", "gpu-smollm2-mech", "--out", str(tmp_path)] + flags) == 0
    assert [cfg.compile for cfg in seen] == [True, False]
    assert PRESETS["cpu-mech"].get("compile", False) is False  # a CPU run never compiles (run_setting checks cuda)


def test_compiling_on_a_gpu_without_triton_says_how_to_run_without(monkeypatch, tmp_path):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    with pytest.raises(ValueError, match="needs Triton.*--no-compile"):
        main(["--preset", "gpu-smollm2-mech", "--out", str(tmp_path)])
    monkeypatch.setattr("minimoe.compress.mechanism.run_mechanism", lambda cfg, out, workers, progress: {"ok": 1})
    (tmp_path / "results.md").write_text("done\n")
    assert main(["--preset", "gpu-smollm2-mech", "--out", str(tmp_path), "--no-compile"]) == 0
