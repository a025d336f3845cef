"""The experts a rank holds, applied to the rows it received.

Row n arrives with m (slot, weight) entries; slot -1 means "not for this rank". The rank returns

    y_n = Σ_{j: s_nj ≥ 0} w_nj · E_{s_nj}(x_n)        (Llama 4 scales the input: E_{s_nj}(w_nj · x_n)),

E_s(x) = (silu(x W_g^s) ⊙ x W_u^s) W_d^s, the SwiGLU expert of ``minimoe.model.moe``. The computation is the
single-process layer's grouped path (MegaBlocks, Gale et al. 2022) over the local slots: flatten the N·m
entries, sort them by slot (invalid entries last), gather the rows, three grouped matrix multiplies,
weight, and add each entry's output to its row (index_add).

The output always depends on ``weights`` through autograd (the final ``out * w``, or ``x * w``), also when
no entry is valid, so the backward of the exchange that delivered them runs on this rank too (one autograd
node carries a leg's rows and weights; see ``minimoe.parallel.comm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minimoe.model.moe import choose_backend, grouped_matmul


def local_experts(rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                  down_proj: torch.Tensor, scales_input: bool = False, backend: str = "auto") -> torch.Tensor:
    """rows (N, H), slots (N, m) int64 local slot ids or -1, weights (N, m) float32, gate_up_proj (S, H, 2F),
    down_proj (S, F, H) -> (N, H) in rows' dtype. ``backend`` as ``MoELayer.grouped_backend``."""
    num_rows, m = slots.shape
    num_slots, hidden, width = gate_up_proj.shape[0], rows.shape[1], down_proj.shape[1]
    if gate_up_proj.shape != (num_slots, hidden, 2 * width) or down_proj.shape != (num_slots, width, hidden):
        raise ValueError(f"expert weights must be (S, {hidden}, 2F) and (S, F, {hidden}), got "
                         f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    flat = slots.reshape(-1)  # (P,) P = N·m, entry p = (row p // m, j = p % m)
    valid = flat >= 0
    key = flat.masked_fill(~valid, num_slots)  # invalid entries sort after every slot
    sorted_key, order = torch.sort(key, stable=True)
    ends = torch.searchsorted(sorted_key, torch.arange(1, num_slots + 1, device=rows.device)).to(torch.int32)
    entry_row = order // m  # (P,)
    x = rows.index_select(0, entry_row)  # (P, H) rows in slot order
    w = weights.reshape(-1, 1).index_select(0, order).to(rows.dtype)  # (P, 1)
    kept = (sorted_key < num_slots).unsqueeze(1)  # (P, 1)
    if scales_input:
        x = x * w
    x = x.where(kept, 0.0)  # rows past the last group are undefined in grouped_mm, and so would be their gradient
    gate_w, up_w = gate_up_proj[:, :, :width], gate_up_proj[:, :, width:]  # (S, H, F) views
    chosen = choose_backend(backend, x, [gate_w, up_w, down_proj])
    group_ends = ends if chosen == "grouped_mm" else ends.tolist()  # per_group reads the ends on the host
    if x.shape[0] == 0:  # nothing received: an empty product that still depends on rows and weights
        out = x
    else:
        gate = grouped_matmul(x, gate_w, group_ends, chosen)  # (P, F)
        up = grouped_matmul(x, up_w, group_ends, chosen)  # (P, F)
        out = grouped_matmul(F.silu(gate) * up, down_proj, group_ends, chosen).where(kept, 0.0)  # (P, H)
    if not scales_input:
        out = out * w
    return rows.new_zeros(num_rows, hidden).index_add(0, entry_row, out)
