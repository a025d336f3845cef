"""Agree before exchanging: every rank compares its expert-parallel configuration with the others.

Ranks that disagree on the number of experts, k, the placement, the hidden size or the dtype would send
each other rows of the wrong size or to the wrong rank, and usually hang or return garbage. So before its
first exchange each expert-parallel layer all-gathers a *fingerprint*, a fixed vector of integers (one
per field: values, dtype codes, and a hash of the placement), and every rank raises the same ValueError
naming the first field that differs, its value on the first rank that disagrees and on rank 0.
"""
from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

from minimoe.parallel.comm import all_gather_rows, group_rank_size

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CODES = {"dtype": DTYPES}


def placement_hash(placement, layer: int) -> int:
    """A 63-bit hash of one layer's slot table and the placement's shape (equal placements, equal hash)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(placement.phy2log[layer], dtype=np.int64).tobytes())
    digest.update(struct.pack("<4q", placement.num_experts, placement.num_nodes, placement.gpus_per_node, layer))
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def fingerprint(num_experts: int, top_k: int, hidden_size: int, dtype: torch.dtype, placement, layer: int,
                world_size: int, wire_format_index: int, capacity_factor: float) -> dict[str, int]:
    """The fields every rank must agree on, as integers."""
    if dtype not in DTYPES:
        raise ValueError(f"expert-parallel layers run in {[str(d) for d in DTYPES]}, got {dtype}")
    return {
        "world size": int(world_size), "num_experts": int(num_experts), "top_k": int(top_k),
        "hidden size": int(hidden_size), "dtype": DTYPES.index(dtype), "placement": placement_hash(placement, layer),
        "placement GPUs": int(placement.num_gpus), "wire format": int(wire_format_index),
        "capacity_factor": struct.unpack("<q", struct.pack("<d", float(capacity_factor)))[0],
    }


def _show(name: str, value: int) -> str:
    if name in _CODES:
        return str(_CODES[name][value])
    if name == "capacity_factor":
        return f"{struct.unpack('<d', struct.pack('<q', value))[0]:g}"
    if name == "placement":
        return f"hash {value:x}"
    return str(value)


def check_fingerprint(fields: dict[str, int], group=None, device=None, what: str = "expert-parallel layer") -> None:
    """All-gather ``fields`` and raise ValueError on every rank if any rank differs from rank 0 (a collective)."""
    mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=device)
    table = all_gather_rows(mine, group, "configuration check").cpu()  # (G, F)
    differ = (table != table[0]).nonzero().tolist()
    if differ:
        rank, column = differ[0]
        name = list(fields)[column]
        me, _ = group_rank_size(group)
        raise ValueError(f"{what}: ranks disagree before any exchange: {name} is "
                         f"{_show(name, int(table[rank, column]))} on rank {rank} but "
                         f"{_show(name, int(table[0, column]))} on rank 0 (raised on rank {me})")
