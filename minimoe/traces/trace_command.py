"""The ``minimoe trace`` command: an expert-activation trace of a model on the bundled multi-domain workload.

``record_workload`` (``minimoe.traces.workload``) runs the prompts, prefill then sampled decode, and records the
router's choices with ``minimoe.traces.recording``; the trace is written by its file's suffix
(``minimoe.traces.parquet_writer.save_trace``).
"""
from __future__ import annotations

from minimoe.arguments import check_output_file
from minimoe.model.transformer import Transformer
from minimoe.traces.parquet_writer import save_trace
from minimoe.traces.workload import (BUNDLED_MODEL, check_run, corpus_prompts, minimoe_tokenize, record_workload,
                                     run_prompts)


def trace_command(args) -> int:
    """``minimoe trace``: run the held-out prompts of the four domains through a minimoe run (``--model``, default
    the bundled checkpoint) or a local transformers MoE folder (``--hf``), record every token's routed experts
    and weights per MoE layer, and save them to ``--out`` (.npz or .parquet). ``args`` is the parsed namespace of
    ``minimoe.cli``. Returns 0; a bad flag raises ValueError or OSError naming it, which the CLI prints as one
    line."""
    out = check_output_file("--out", args.out, (".npz", ".parquet"))
    if args.model:
        check_run("--model", args.model)
    if args.hf:
        from minimoe.hf.checkpoint import load_for_tracing

        model, tokenize = load_for_tracing("--hf", args.hf)
        texts, domains = corpus_prompts(args.requests_per_domain, seed=args.seed)
        name = f"hf:{args.hf}"
    else:
        model_dir = args.model or BUNDLED_MODEL
        texts, domains = run_prompts(model_dir, args.requests_per_domain, args.seed)
        model, tokenize, name = Transformer.load(model_dir).eval(), minimoe_tokenize(model_dir), None
    try:
        trace = record_workload(model, tokenize, texts, domains, args.new_tokens, args.batch_size, name=name,
                                temperature=args.temperature, seed=args.seed, progress=True)
    except ValueError as error:  # what the checkpoint holds (its routers, its tokenizer's ids): name the folder
        if not args.hf:
            raise
        beyond = "its tokenizer gives ids its embedding does not have; " if "vocab_size" in str(error) else ""
        raise ValueError(f"--hf {args.hf}: {beyond}{error}") from None
    save_trace(trace, out)
    print(f"{trace.num_requests} requests, {trace.num_tokens} tokens, {trace.num_layers} MoE layers -> {out}")
    return 0
