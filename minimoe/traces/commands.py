"""The ``minimoe trace`` and ``minimoe findings`` commands (wired by ``minimoe.cli``).

``trace`` records the routing of a minimoe or transformers MoE model on held-out prompts of the four domains
into a trace file; ``findings`` prints the paper's three observations on a trace, each beside its baseline
(``minimoe.traces.findings``). Both read ``--trace FILE`` or record the bundled model (``load_or_record``).
"""

from __future__ import annotations

from minimoe.paths import check_input_file, check_model_dir, check_output_file, progress


def trace_command(args) -> int:
    from minimoe.traces.workload import BUNDLED_MODEL, corpus_prompts, minimoe_tokenize, record_workload, run_prompts

    out = check_output_file("--out", args.out, ".parquet" if args.out.lower().endswith(".parquet") else ".npz")
    check_model_dir("--model", args.model)
    if args.hf:
        check_model_dir("--hf", args.hf)
        texts, domains = corpus_prompts(args.requests_per_domain, seed=args.seed)
        from transformers import AutoTokenizer

        from minimoe.hf.convert import load_hf

        try:
            model = load_hf(args.hf).eval()
        except Exception as error:  # damaged weights or configs raise OSError, ValueError, SafetensorError...
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"--hf {args.hf}: cannot load the checkpoint ({type(error).__name__}: {first[:200]})") \
                from None
        hf_tokenizer = AutoTokenizer.from_pretrained(args.hf, local_files_only=True)
        tokenize = lambda text: hf_tokenizer(text)["input_ids"]  # noqa: E731
        name = f"hf:{args.hf}"
    else:
        from minimoe.model.transformer import Transformer

        model_dir = args.model or BUNDLED_MODEL
        texts, domains = run_prompts(model_dir, args.requests_per_domain, args.seed)
        model, tokenize, name = Transformer.load(model_dir).eval(), minimoe_tokenize(model_dir), None
    trace = record_workload(model, tokenize, texts, domains, args.new_tokens, args.batch_size, name=name,
                            temperature=args.temperature, seed=args.seed, progress=True)
    from minimoe.traces.parquet import save_trace

    save_trace(trace, out)
    print(f"{trace.num_requests} requests, {trace.num_tokens} tokens, {trace.num_layers} MoE layers -> {out}")
    return 0


def load_or_record(args, say=progress):
    """The trace a findings/report run works on: ``--trace FILE`` (a per-token or a load-only trace; a .parquet
    file is opened and read later in batches) or a recording of ``--model``."""
    from minimoe.traces.loads import read_trace_file
    from minimoe.traces.parquet import ParquetTrace, is_parquet

    if args.trace:
        return ParquetTrace(args.trace) if is_parquet(args.trace) else read_trace_file(args.trace)
    from minimoe.traces.workload import BUNDLED_MODEL, bundled_trace

    say(f"recording {4 * args.requests_per_domain} requests of the four domains ({args.new_tokens} decode "
        f"tokens each)")
    return bundled_trace(num_per_domain=args.requests_per_domain, max_new_tokens=args.new_tokens, seed=args.seed,
                         model_dir=args.model or BUNDLED_MODEL, temperature=args.temperature, progress=True)


def findings_command(args) -> int:
    import json

    from minimoe.traces.findings import findings, format_findings
    from minimoe.traces.format import Trace

    check_input_file("--trace", args.trace)
    out = check_output_file("--out", args.out, ".json") if args.out else None
    save = check_output_file("--save-trace", args.save_trace, ".npz") if args.save_trace else None
    trace = load_or_record(args)
    from minimoe.traces.loads import LoadTrace

    if isinstance(trace, LoadTrace):
        raise ValueError(f"--trace {args.trace}: a load trace (counts per expert only): the findings need per-token "
                         "routing; minimoe report --trace on it shows what counts support")
    if save:
        from minimoe.traces.parquet import save_trace

        save_trace(trace if isinstance(trace, Trace) else trace.read(), save)
    progress("findings: imbalance, domain specificity, prefill -> decode")
    if isinstance(trace, Trace):
        result = findings(trace, seed=args.seed)
    else:  # a Parquet file: one pass over its batches
        from minimoe.placement.engine import LocalEngine, run_passes
        from minimoe.traces.findings import findings_of_stats

        result = findings_of_stats(run_passes(trace, LocalEngine(), 0, 1, args.seed), seed=args.seed)
    print(format_findings(result))
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    return 0
