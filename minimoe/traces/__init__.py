"""Expert-activation traces: which experts each token used, in every MoE layer, prefill and decode.

``format`` defines the ``Trace`` type and ``trace_file`` its strict ``.npz`` file (they know nothing of models);
``parquet`` the columnar format for traces beyond memory, read and checked batch by batch (``batches``) and written
by ``parquet_writer``, and ``stats`` the statistics of one pass over such a trace, which merge across workers (with
the ``bottomk`` sample); ``recording`` records traces from minimoe and transformers MoE models (the
``minimoe trace`` command: ``trace_command``). Serving engines' files come in through ``importers`` (vLLM and SGLang
routed-experts captures), ``importers_jsonl`` with ``jsonl_tokens`` (JSONL routing logs), and ``loads``,
``load_dumps`` and ``load_dumps_trtllm`` (the engines' expert-load dumps: counts only, a ``LoadTrace``); ``layers``
maps a model's layer numbering to its MoE layers, and ``convert`` (the ``minimoe import`` command) writes any of
them as a trace file. ``workload`` is the bundled model's multi-domain workload; ``synthetic`` makes traces with
known structure; ``analysis`` and ``findings`` measure imbalance, domain specificity and how well prefill predicts
decode. Chapter 4 teaches this part.
"""

from minimoe.traces.format import PHASES, Trace, concat
from minimoe.traces.importers import from_sglang, from_vllm
from minimoe.traces.importers_jsonl import from_jsonl
from minimoe.traces.loads import LoadTrace, read_trace_file
from minimoe.traces.synthetic import planted_trace, synthetic_trace

__all__ = ["BUNDLED_MODEL", "LoadTrace", "PHASES", "Trace", "bundled_trace", "concat", "from_jsonl", "from_sglang",
           "from_vllm", "planted_trace", "read_trace_file", "record", "synthetic_trace"]

_NEEDS_TORCH = {"record": "recording", "bundled_trace": "workload", "BUNDLED_MODEL": "workload"}


def __getattr__(name: str):
    """The recording names load torch, so they are imported on first use (PEP 562): reading and analysing
    traces, and the placement fits' worker processes, start without it."""
    if name in _NEEDS_TORCH:
        import importlib

        return getattr(importlib.import_module(f"minimoe.traces.{_NEEDS_TORCH[name]}"), name)
    raise AttributeError(f"module 'minimoe.traces' has no attribute {name!r}")
