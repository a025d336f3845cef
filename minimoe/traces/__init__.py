"""Expert-activation traces: which experts each token used, in every MoE layer, prefill and decode.

``format`` defines the ``Trace`` type and its strict ``.npz`` file format (it knows nothing of models);
``parquet`` the columnar format for traces beyond memory, read and checked batch by batch (``batches``), and
``stats`` the statistics of one pass over such a trace, which merge across workers;
``recording`` records traces from minimoe and transformers MoE models; ``importers`` converts vLLM and SGLang
routed-experts captures, ``importers_jsonl`` JSONL routing logs, ``loads`` and ``load_dumps`` the engines'
expert-load dumps (counts only: a ``LoadTrace``), ``layers`` maps a model's layer numbering to its MoE layers,
and ``convert`` (the ``minimoe import`` command) any of them to a trace file; ``workload`` is the bundled model's multi-domain workload; ``synthetic``
makes traces with known structure; ``analysis`` and ``findings`` measure imbalance, domain specificity and
how well prefill predicts decode. Chapter 4 teaches this part.
"""

from minimoe.traces.format import PHASES, Trace, concat
from minimoe.traces.importers import from_sglang, from_vllm
from minimoe.traces.importers_jsonl import from_jsonl
from minimoe.traces.loads import LoadTrace, read_trace_file
from minimoe.traces.recording import record
from minimoe.traces.synthetic import planted_trace, synthetic_trace
from minimoe.traces.workload import BUNDLED_MODEL, bundled_trace

__all__ = ["BUNDLED_MODEL", "LoadTrace", "PHASES", "Trace", "bundled_trace", "concat", "from_jsonl", "from_sglang",
           "from_vllm", "planted_trace", "read_trace_file", "record", "synthetic_trace"]
