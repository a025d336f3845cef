"""A rank's experts on the rows it received: y_n = Σ_j w_nj · E_{s_nj}(x_n) over the entries whose slot is local.

Row n arrives with m (slot, weight) entries; slot -1 means "not for this rank". Local slot s holds a copy of
logical expert ``phy2log[layer, r·S + s]`` with S = slots_per_gpu, and E_s(x) = (silu(x W_g^s) ⊙ x W_u^s) W_d^s,
the SwiGLU expert of ``minimoe.model.moe``. The computation is the single-process layer's grouped path
(``minimoe.model.grouped.grouped_experts``: sort the entries by slot, grouped matrix multiplies, one weighted
gather-sum) over the local slots, with "not for this rank" as the group after the last slot. It syncs with
the host on no backend but "per_group", so it can run inside a CUDA graph.

The output always depends on ``weights`` through autograd (the weighted sum, or the input scaling), also when
no entry is valid, so the backward of the exchange that delivered them runs on this rank too (one autograd
node carries a leg's rows and weights; see ``minimoe.parallel.legs``).
"""
from __future__ import annotations

import torch

from minimoe.model.grouped import grouped_experts


def local_experts(rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                  down_proj: torch.Tensor, scales_input: bool = False, backend: str = "auto") -> torch.Tensor:
    """rows (N, H), slots (N, m) int64 local slot ids or -1, weights (N, m) float32, gate_up_proj (S, H, 2F),
    down_proj (S, F, H) -> (N, H) in rows' dtype. ``backend`` as ``MoELayer.grouped_backend``.
    Raises ValueError when the expert weights do not match the rows, or (on the CPU) for a slot id outside
    [-1, S)."""
    num_slots, hidden, width = gate_up_proj.shape[0], rows.shape[1], down_proj.shape[1]
    if gate_up_proj.shape != (num_slots, hidden, 2 * width) or down_proj.shape != (num_slots, width, hidden):
        raise ValueError(f"expert weights must be (S, {hidden}, 2F) and (S, F, {hidden}), got "
                         f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    if not slots.is_cuda and slots.numel() and not -1 <= int(slots.min()) <= int(slots.max()) < num_slots:
        raise ValueError(f"slots must be local slot ids in [0, {num_slots}) or -1, got ids in "
                         f"[{int(slots.min())}, {int(slots.max())}] (checked on the CPU; a GPU trusts them)")
    ids = torch.where(slots >= 0, slots, num_slots)  # (N, m): slot num_slots = "not for this rank"
    return grouped_experts(rows, ids, weights, gate_up_proj, down_proj, scales_input, backend)
