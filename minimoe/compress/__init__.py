"""Soft-prompt compression: PIC and the global (ICAE) and gist baselines. Chapter 8 teaches it.

Read in this order: ``masks`` (the causal, ICAE-global, PIC-chunked and gist masks, with their position ids),
``compressor`` (base LM + LoRA + memory tokens; the frozen decoder reads the memory), ``objectives``
(autoencoding, continuation, QA; greedy answers), ``metrics`` (SQuAD EM / F1), ``qa_data`` (generated
offline QA documents), ``training`` (pretraining the reader, training and scoring compressors), ``setup``
(tokenizer, QA splits, the reader and its bounds), ``analysis`` (memory-to-text attention, time to reach a
target), ``report`` (the tables) and ``experiment`` (``minimoe pic-experiment``); the designed experiment of
chapter 8's section 8.12 in ``mechanism`` (with ``mechanism_data``, ``mechanism_training``, ``mechanism_stats`` and
``mechanism_report``), and the SmolLM2 reader in ``smollm2``.
This part builds on ``minimoe.model``, ``minimoe.data`` and ``minimoe.hf`` (the SmolLM2 reader's conversion).
"""

from minimoe.compress.compressor import Compressor, final_hidden
from minimoe.compress.masks import Layout, build_layout, causal_mask, check_mask, gist_mask, global_mask, pic_mask, \
    show_mask
from minimoe.compress.metrics import exact_match, f1_score, normalize_answer, squad_scores
from minimoe.compress.objectives import autoencoding_example, continuation_example, decoder_loss, qa_example
from minimoe.compress.qa_data import QADocument, Question, generate_documents, pack

__all__ = ["Compressor", "Layout", "QADocument", "Question", "autoencoding_example", "build_layout", "causal_mask",
           "check_mask", "continuation_example", "decoder_loss", "exact_match", "f1_score", "final_hidden",
           "generate_documents", "gist_mask", "global_mask", "normalize_answer", "pack", "pic_mask", "qa_example",
           "show_mask", "squad_scores"]
