"""How well the frozen reader of a ``pic-experiment`` run answers with the full context, by context length.

    python benchmarks/pic_reader_by_context.py RUN_DIR [--documents 32]

For contexts of 1, 2, 4 and 8 paragraphs (64 .. 512 tokens) it generates dev-split documents (seed 5, two
questions each) and prints SQuAD EM / F1 of the reader reading the whole context. A reader that is good on
short contexts and poor on long ones has learned the lookup but not its reach: pretrain it longer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minimoe.compress.experiment_config import ExperimentConfig
from minimoe.compress.qa_data import generate_documents
from minimoe.compress.setup import sentence_token_counter, load_prepared
from minimoe.compress.training import build_qa_set, evaluate_reader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pic_reader_by_context", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the --out directory of a pic-experiment (tokenizer.json, base/)")
    parser.add_argument("--documents", type=int, default=32, help="documents per length (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    cfg = ExperimentConfig(device="cpu", bf16=False, train_documents=1, dev_documents=1, test_documents=1)
    prepared = load_prepared(cfg, Path(args.run_dir))
    print("| context tokens | paragraphs | questions | EM | F1 |\n|---:|---:|---:|---:|---:|")
    for paragraphs in (1, 2, 4, 8):
        tokens = paragraphs * cfg.block_tokens
        docs = generate_documents("dev", args.documents, 5, prepared.encode, tokens, cfg.block_tokens, 2,
                                  sentence_token_counter(prepared.tokenizer))
        data = build_qa_set(docs, prepared.encode, cfg.block_tokens, prepared.pad_id)
        scores = evaluate_reader(prepared.base, data, "full", prepared.bos_id, prepared.stop_ids, prepared.decode)
        print(f"| {tokens} | {paragraphs} | {scores['count']} | {scores['em']:.1f} | {scores['f1']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
