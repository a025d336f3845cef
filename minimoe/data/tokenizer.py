"""Byte-level BPE tokenizer and the token batches a language model trains on.

Byte-level BPE (GPT-2, Radford et al. 2019; BPE for words: Sennrich et al. 2016): text is turned
into UTF-8 bytes, each byte is a symbol of a 256-letter alphabet, and training repeatedly merges the
most frequent adjacent pair of symbols into a new symbol until the vocabulary has `vocab_size`
entries. Because every byte is in the alphabet, any string encodes, and decoding the ids gives back
exactly the same string. A pre-tokenizer first cuts text into word-like pieces (a regex over
letters, digits, spaces, punctuation), so merges never cross those boundaries. We use the Rust
`tokenizers` library to train (seconds for a few MB on one core).

Special tokens, ids 0, 1, 2: `<|bos|>` starts every document, `<|eos|>` ends it, `<|pad|>` fills
the last validation window. They are added by `encode_documents`, never by the text: the tokenizer
is set to encode a literal "<|eos|>" inside a document as ordinary bytes (`encode_special_tokens`,
which tokenizer.json does not store, so `load_tokenizer` sets it again).

Determinism: BPE training has no randomness. Merge ties are broken by symbol ids, which for a
byte-level BPE without a continuing-subword prefix come from the sorted alphabet, so the same texts
give a byte-identical tokenizer.json (tests check this in one process and across processes; it was
also the same on Python 3.12 with tokenizers 0.23.2 on 16 cores as on Python 3.11, 0.23.3, 2 cores).

Training batches: documents become `<|bos|> text <|eos|>` id arrays; `batch_iterator` concatenates
them in a seeded random order into one stream per epoch and cuts it into windows of `seq_len + 1`
tokens (a random offset per epoch): inputs = window[:-1], labels = window[1:]. A label that is
`<|bos|>` (the start of the next document, unpredictable from the previous one) is -100, the ignore
index of `torch.nn.functional.cross_entropy`. `validation_batches` covers each domain's documents
exactly once, in order, padding the last window (labels -100), so the mean loss over the non-ignored
labels is the per-domain validation loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minimoe.data.corpora import DOMAINS, Document

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2
IGNORE_INDEX = -100
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (256 bytes + 3 special tokens + merges)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size!r}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not any(texts) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty iterable of strings with some text in it")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path) -> Path:
    """Write tokenizer.json to `path` (a file name, or a directory that receives tokenizer.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    tokenizer.save(str(path), pretty=True)
    return path


def load_tokenizer(path) -> Tokenizer:
    """Read a tokenizer.json written by `save_tokenizer` (or a directory holding one). Raises FileNotFoundError
    when there is none, ValueError when it is damaged or not a minimoe tokenizer."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises a bare Exception for a damaged file
        raise ValueError(f"{path} is not a readable tokenizer file ({str(error).strip()[:200]})") from None
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise ValueError(f"{path}: special token {token!r} should have id {expected_id}, "
                             f"found {tokenizer.token_to_id(token)!r}; not a minimoe tokenizer")
    tokenizer.encode_special_tokens = True
    return tokenizer


def encode_documents(tokenizer: Tokenizer, docs: Sequence[Document]) -> list[np.ndarray]:
    """Each document as an int32 array `<|bos|> ids... <|eos|>`, in the order given."""
    texts = [doc.text if isinstance(doc, Document) else doc for doc in docs]
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("docs must be Document objects or strings")
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    if bos is None or eos is None:
        raise ValueError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}; train it with train_tokenizer")
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.asarray([bos, *enc.ids, eos], dtype=np.int32) for enc in encodings]


# --------------------------------------------------------------------------- batches
class Batch(NamedTuple):
    input_ids: np.ndarray   # int64 (B, T)
    labels: np.ndarray      # int64 (B, T), -100 = ignore
    domain_ids: np.ndarray  # int64 (B, T), index into data.DOMAINS of the document each input token is in


def _check_stream_inputs(token_arrays, domains, seq_len, batch_size) -> np.ndarray:
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if len(token_arrays) != len(domains) or not token_arrays:
        raise ValueError(f"need one domain per token array and at least one array, got "
                         f"{len(token_arrays)} arrays and {len(domains)} domains")
    unknown = sorted({d for d in domains if d not in DOMAINS})
    if unknown:
        raise ValueError(f"unknown domains {unknown}; expected names from {DOMAINS}")
    return np.asarray([DOMAINS.index(d) for d in domains], dtype=np.int64)


def _labels(targets: np.ndarray, bos_id: int) -> np.ndarray:
    labels = targets.astype(np.int64)
    labels[targets == bos_id] = IGNORE_INDEX
    return labels


def batch_iterator(token_arrays: Sequence[np.ndarray], domains: Sequence[str], seq_len: int, batch_size: int,
                   seed: int = 0, epochs: int | None = None, bos_id: int = 0) -> Iterator[Batch]:
    """Random training windows over all documents, `epochs` passes (None = forever); same seed, same batches."""
    domain_of_doc = _check_stream_inputs(token_arrays, domains, seq_len, batch_size)
    rng = np.random.default_rng(seed)
    lengths = np.asarray([len(a) for a in token_arrays])
    if lengths.sum() < batch_size * seq_len + seq_len + 1:
        raise ValueError(f"{lengths.sum()} tokens are too few for one batch of {batch_size} x {seq_len} "
                         f"(plus a random offset of up to {seq_len})")
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(len(token_arrays))
        tokens = np.concatenate([token_arrays[i] for i in order])                      # (N,)
        domain_ids = np.repeat(domain_of_doc[order], lengths[order])                    # (N,)
        offset = int(rng.integers(0, seq_len))
        num_windows = (len(tokens) - offset - 1) // seq_len
        starts = offset + seq_len * rng.permutation(num_windows)                        # (W,)
        positions = np.arange(seq_len + 1)
        for b in range(num_windows // batch_size):
            windows = starts[b * batch_size:(b + 1) * batch_size, None] + positions     # (B, T+1)
            chunk = tokens[windows]
            yield Batch(chunk[:, :-1].astype(np.int64), _labels(chunk[:, 1:], bos_id),
                        domain_ids[windows[:, :-1]])
        epoch += 1


def validation_batches(token_arrays: Sequence[np.ndarray], domains: Sequence[str], seq_len: int,
                       batch_size: int, bos_id: int = 0, pad_id: int = 2) -> dict[str, list[Batch]]:
    """{domain: batches} covering every next-token prediction of that domain's documents exactly once."""
    domain_of_doc = _check_stream_inputs(token_arrays, domains, seq_len, batch_size)
    result = {}
    for domain_id, domain in enumerate(DOMAINS):
        members = [a for a, d in zip(token_arrays, domain_of_doc) if d == domain_id]
        if not members:
            continue
        tokens = np.concatenate(members)                                                 # (N,)
        num_windows = -(-(len(tokens) - 1) // seq_len)                                  # ceil((N-1)/T)
        padded = np.full(num_windows * seq_len + 1, pad_id, dtype=np.int64)
        padded[:len(tokens)] = tokens
        windows = np.arange(num_windows)[:, None] * seq_len + np.arange(seq_len + 1)  # (W, T+1)
        chunk = padded[windows]
        labels = _labels(chunk[:, 1:], bos_id)
        labels[windows[:, 1:] >= len(tokens)] = IGNORE_INDEX                            # padding
        batches = [Batch(chunk[i:i + batch_size, :-1], labels[i:i + batch_size],
                         np.full((min(batch_size, num_windows - i), seq_len), domain_id, dtype=np.int64))
                   for i in range(0, num_windows, batch_size)]
        result[domain] = batches
    return result
