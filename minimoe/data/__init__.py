"""Data and training: four offline corpora (code, math, chat, general), a byte-level BPE tokenizer and the
training loop that produces the bundled multi-domain MoE model. Chapter 3 walks through it.

``corpora`` loads and splits the domains (``chat`` and ``math_problems`` generate two of them), ``tokenizer``
trains the BPE and batches token streams, ``train`` trains with per-domain validation and exact resumption
(``train_config``: the settings, the presets, and what a resumed run may change).
"""

from minimoe.data.corpora import DOMAINS, Document, Splits, load_corpus, split_documents
from minimoe.data.tokenizer import load_tokenizer, train_tokenizer
from minimoe.data.train import train, validation_losses
from minimoe.data.train_config import PRESETS, TrainConfig, preset

__all__ = ["DOMAINS", "Document", "PRESETS", "Splits", "TrainConfig", "load_corpus", "load_tokenizer",
           "preset", "split_documents", "train", "train_tokenizer", "validation_losses"]
