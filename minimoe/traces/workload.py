"""A serving workload from the offline corpora: prompts from four domains, recorded as an expert trace.

The paper's traces are requests sent to a deployed model. Ours are built the same way, offline:

    held-out documents (test split, never trained on) of each domain
      -> a random window of text per request (a "prompt"), equal numbers per domain, shuffled
      -> tokenised by the model's own tokenizer (minimoe BPE or a transformers tokenizer)
      -> prefill + sampled decode of `max_new_tokens`, every routing decision recorded (``recording.record``)

``bundled_trace()`` does this for the checkpoint shipped in ``checkpoints/`` and is what the findings
script, the placement experiments and ``minimoe report`` start from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minimoe.data.corpora import DOMAINS, load_corpus, split_documents
from minimoe.traces.format import Trace

BUNDLED_MODEL = Path(__file__).resolve().parents[2] / "checkpoints" / "moe-4domain"


def corpus_prompts(num_per_domain: int, prompt_chars: tuple[int, int] = (200, 400), seed: int = 0,
                   max_chars_per_domain: int = 2_500_000, split: str = "test", corpus_seed: int = 0,
                   domains=DOMAINS) -> tuple[list[str], list[str]]:
    """(texts, domains): ``num_per_domain`` random windows of held-out text per domain, in a shuffled order.

    ``corpus_seed`` and ``max_chars_per_domain`` must be the training run's, so that ``split`` names the same
    documents the model never saw.
    """
    if num_per_domain < 1 or not 0 < prompt_chars[0] <= prompt_chars[1]:
        raise ValueError(f"need num_per_domain >= 1 and 0 < min <= max prompt chars, got {num_per_domain}, {prompt_chars}")
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be train, validation or test, got {split!r}")
    corpus = load_corpus(domains=domains, max_chars_per_domain=max_chars_per_domain, seed=corpus_seed)
    docs = getattr(split_documents([d for name in domains for d in corpus[name]], seed=corpus_seed), split)
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for domain in domains:
        pool = [d.text for d in docs if d.domain == domain and len(d.text) > prompt_chars[0]]
        if not pool:
            raise ValueError(f"the {split} split has no {domain} document longer than {prompt_chars[0]} characters")
        for _ in range(num_per_domain):
            text = pool[rng.integers(len(pool))]
            length = int(rng.integers(prompt_chars[0], prompt_chars[1] + 1))
            start = int(rng.integers(0, max(1, len(text) - length)))
            texts.append(text[start : start + length])
            labels.append(domain)
    order = rng.permutation(len(texts))  # requests arrive mixed, not grouped by domain
    return [texts[i] for i in order], [labels[i] for i in order]


def record_workload(model, tokenize, texts: list[str], domains: list[str], max_new_tokens: int = 32,
                    batch_size: int = 64, name: str | None = None, temperature: float = 0.7, top_p: float = 0.9,
                    seed: int = 0, progress: bool = False) -> Trace:
    """Tokenise ``texts`` with ``tokenize(str) -> list[int]`` and record prefill + decode routing.

    Decode samples like a chat server does (temperature 0.7, nucleus 0.9, seeded): greedy decoding of a small
    model loops on a few tokens and makes decode traffic unrealistically narrow (its expert load has nothing
    in common with prefill's), while temperature 1 lets a 4 M-parameter model drift off its prompt's domain.
    """
    from tqdm.auto import tqdm

    from minimoe.traces.recording import record

    # a long workload takes a while to tokenise (about 80 s for 400,000 prompts): say so, as recording does
    quick = len(texts) < 10_000  # a second or two: no bar
    prompts = [tokenize(text) for text in tqdm(texts, desc="tokenising", unit="prompt",
                                               disable=not progress or quick, mininterval=1.0)]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompts {empty[:5]} tokenise to nothing")
    check_length(model, max(len(p) for p in prompts), max_new_tokens)
    return record(model, prompts, max_new_tokens, domains, batch_size=batch_size, name=name,
                  temperature=temperature, top_p=top_p, seed=seed, progress=progress)


def check_length(model, longest_prompt: int, max_new_tokens: int) -> None:
    """Raises ValueError naming --new-tokens and the largest allowed value when the longest prompt and its
    decode tokens exceed a minimoe model's ``max_seq_len`` (a transformers model has no such limit here)."""
    limit = getattr(model.config, "max_seq_len", None)
    if limit is not None and longest_prompt + max_new_tokens > limit:
        raise ValueError(f"--new-tokens {max_new_tokens}: the longest prompt has {longest_prompt} tokens and the model "
                         f"reads at most max_seq_len={limit}: expected --new-tokens {limit - longest_prompt} or fewer")


def minimoe_tokenize(model_dir):
    """A ``str -> list[int]`` for a minimoe run directory: <|bos|> + BPE ids (how training saw documents)."""
    from minimoe.data.tokenizer import BOS, load_tokenizer

    tokenizer = load_tokenizer(Path(model_dir) / "tokenizer.json")
    bos = tokenizer.token_to_id(BOS)
    return lambda text: [bos] + tokenizer.encode(text, add_special_tokens=False).ids


def check_run(flag: str, model_dir) -> None:
    """A minimoe training run whose workload can be recorded: an MoE checkpoint (``check_moe_model_dir``) with
    the train_config.json that names its corpus. Raises ValueError naming ``flag`` and what is wrong."""
    from minimoe.arguments import check_moe_model_dir
    from minimoe.data.train_config import load_train_config

    check_moe_model_dir(flag, str(model_dir))
    try:
        load_train_config(model_dir)
    except ValueError as error:
        raise ValueError(f"{flag} {model_dir}: {error}") from None


def run_prompts(model_dir, num_per_domain: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Held-out prompts for a minimoe run directory: the test split of the corpus that run trained on. Raises
    ValueError when its train_config.json is missing or damaged (``load_train_config``)."""
    from minimoe.data.train_config import load_train_config

    train_config = load_train_config(model_dir)
    return corpus_prompts(num_per_domain, seed=seed, corpus_seed=train_config.seed,
                          max_chars_per_domain=train_config.max_chars_per_domain)


def bundled_trace(num_per_domain: int = 500, max_new_tokens: int = 32, seed: int = 0, model_dir=BUNDLED_MODEL,
                  batch_size: int = 64, temperature: float = 0.7, top_p: float = 0.9, progress: bool = False) -> Trace:
    """The workload trace of a minimoe checkpoint (default: the bundled 4-domain MoE), recorded on CPU."""
    import torch

    from minimoe.model.transformer import Transformer

    model_dir = Path(model_dir)
    texts, domains = run_prompts(model_dir, num_per_domain, seed)
    torch.manual_seed(seed)
    model = Transformer.load(model_dir).eval()
    return record_workload(model, minimoe_tokenize(model_dir), texts, domains, max_new_tokens, batch_size,
                           name=f"minimoe:{model_dir.name}", temperature=temperature, top_p=top_p, seed=seed,
                           progress=progress)
