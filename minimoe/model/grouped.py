"""Grouped experts: every (row, expert) entry of a batch through its SwiGLU expert, in a few kernels, no host sync.

For rows x (N, H) whose entries (n, j) name an expert e_nj (or none) with a weight w_nj, compute

    y_n = Σ_j w_nj · E_{e_nj}(x_n),        E_e(x) = (silu(x W_g^e) ⊙ x W_u^e) W_d^e

the MegaBlocks way (Gale et al. 2022, "dropless MoE"): sort the N·m entries by expert (invalid ones last),
gather the rows in that order, run one **grouped matrix multiply** per weight (rows [ends[e-1], ends[e]) times
expert e's matrix) and sum each row's entries back with one ``embedding_bag``: a gather at the inverse
permutation fused with the weighted sum (no scatter-add, no atomics, deterministic).

On CUDA with Triton the same computation takes fewer launches (at a few hundred tokens the host's 15-35 µs per
op, not the GPU, sets the pace): the expert order comes from a counting sort in two kernels
(``grouped_layout_triton``, no ``torch.sort``; for a small batch the router's kernel builds it,
``route_layout_triton``), gate and up are one transposed product, and without a gradient
silu·up and the weighted sum are one kernel each (``swiglu_triton``, ``bag_sum_triton``). The PyTorch path
below is the reference they are tested against.

Grouped-multiply backends (``grouped_matmul``), x (S, K) sorted by group, weight (G, K, N) -> (S, N):

* ``grouped_mm``   ``torch._grouped_mm(x, weight, offs=ends)``: the rows are the ragged dimension. Fast when
  each expert gets many rows; with few rows (decode) its tiles of 64 rows read each weight tile once per
  64 rows of tokens, so the weight bytes stream several times.
* ``grouped_mm_t`` the same products transposed, ``(Wᵀ xᵀ)ᵀ``: the weights are the left operand and the
  tokens the ragged columns (the "swap AB" trick of small-batch GEMM kernels), so a tile spans many tokens
  of one expert and the weights stream about once. The CUDA kernel needs every group's columns to start at a
  16-byte boundary of the output, so each group is padded to a multiple of ``row_alignment`` rows (at most
  ``row_alignment - 1`` zero rows per expert, a bound known without reading the counts).
* ``triton``       a backend of ``grouped_experts`` only (``grouped_matmul`` does not take it): the whole SwiGLU
  expert in two Triton kernels (``experts_triton``), gate and up with the gather of the rows and silu·mul folded
  in, then down, each expert's weights streamed about once. CUDA, bf16 or fp16, forward only.
* ``per_group``    one matmul per non-empty group; reads the ends on the host (a sync; not capturable).

``auto`` picks ``triton`` on CUDA without a gradient when experts get at most ``TRITON_MAX_ROWS_PER_GROUP`` rows
on average (and torch's products could run too), else ``grouped_mm_t`` up to ``SWAP_AB_MAX_ROWS_PER_GROUP``,
``grouped_mm`` beyond, and
``per_group`` only where ``torch._grouped_mm`` cannot run (old torch, float64, CUDA before sm80 or not bf16,
sizes that are not multiples of 16 bytes). ``auto`` never syncs, so the whole computation can be captured in a
CUDA graph.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from minimoe.model import bag_sum_triton

_warned_swap_ab: list = []
BACKENDS = ("auto", "grouped_mm", "grouped_mm_t", "triton", "per_group")
SWAP_AB_MAX_ROWS_PER_GROUP = 256
# "auto" takes ``experts_triton``'s kernels up to this average: faster than torch's transposed products from 64 to
# 1024 tokens (8 to 256 rows per expert) at Mixtral-8x7B shapes with near-uniform routing, bf16, on an H100
# (benchmarks/results/moe_experts_kernels_h100.md); other shapes, skews and cards were not measured
TRITON_MAX_ROWS_PER_GROUP = 256


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)  # (asked on every forward: cached)


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can multiply x (S, K) by weight (G, K, N) here."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or _capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    for t in (x, weight):  # the kernels need 16-byte aligned pointers and strides
        if t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride() if s != 1):
            return False
    return True


def choose_backend(requested: str, x: torch.Tensor, weights: list[torch.Tensor], num_rows: int | None = None,
                   fused: bool = True) -> str:
    """Resolve "auto" for products of x (S, K) by each of ``weights`` (G, K, N); see the module docstring.
    ``num_rows``: S when x is not yet the sorted rows (its dtype, device and alignment still count).
    ``fused=False``: torch's products only (where the Triton experts cannot serve the call). "auto" takes the
    Triton experts only where torch's products could run too, so falling back from them never fails."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        return requested
    if not all(grouped_mm_supported(x, w) for w in weights):
        return "per_group"
    rows = x.shape[0] if num_rows is None else num_rows
    if fused and x.is_cuda and rows <= TRITON_MAX_ROWS_PER_GROUP * weights[0].shape[0]:
        from minimoe.model import experts_triton  # here: it loads Triton

        if experts_triton.why_not(x, *weights) is None:
            return "triton"
    few_rows = rows <= SWAP_AB_MAX_ROWS_PER_GROUP * weights[0].shape[0]
    return "grouped_mm_t" if x.device.type == "cuda" and few_rows else "grouped_mm"


def _check_triton(x: torch.Tensor, *weights: torch.Tensor) -> None:
    """Raise ValueError naming what keeps the Triton experts from running on x with these weights."""
    from minimoe.model import experts_triton  # here: it loads Triton

    problem = experts_triton.why_not(x, *weights)
    if problem is not None:
        raise ValueError(f"grouped backend 'triton' cannot run here: {problem}; 'auto' picks what can")


def row_alignment(x: torch.Tensor) -> int:
    """Rows per 16 bytes of x's dtype: ``grouped_mm_t`` wants the row count to be a multiple of it."""
    return max(1, 16 // x.element_size())


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_ends, backend: str = "grouped_mm") -> torch.Tensor:
    """x (S, K) sorted by group, weight (G, K, N) -> (S, N): rows [ends[g-1], ends[g]) times weight[g].

    group_ends: (G,) int32 tensor (on x's device) or a list of ints; backend as the module docstring says.
    Rows at or after ends[-1] are left undefined by ``torch._grouped_mm`` (zeros with "per_group"): callers
    mask them. "grouped_mm_t" returns a column-major (S, N) view.
    """
    if backend in ("grouped_mm", "grouped_mm_t"):
        ends = group_ends if isinstance(group_ends, torch.Tensor) else torch.tensor(group_ends, dtype=torch.int32)
        ends = ends.to(device=x.device, dtype=torch.int32)
        if backend == "grouped_mm":
            return torch._grouped_mm(x, weight, offs=ends)
        rows, pad = x.shape[0], -x.shape[0] % row_alignment(x)
        if pad:  # the output (N, S) needs 16-byte aligned rows
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        try:
            return torch._grouped_mm(weight.transpose(-2, -1), x.T, offs=ends).T[:rows]  # (S, N) from (N, S)
        except RuntimeError as error:  # a torch build whose kernel refuses the transposed layout
            if not _warned_swap_ab:
                warnings.warn(f"grouped_mm_t is not available here ({str(error).splitlines()[0]}); "
                              "using grouped_mm instead", RuntimeWarning, stacklevel=2)
                _warned_swap_ab.append(True)
            return torch._grouped_mm(x[:rows], weight, offs=ends)
    if backend != "per_group":
        raise ValueError(f"backend must be 'grouped_mm', 'grouped_mm_t' or 'per_group', got {backend!r}")
    ends = group_ends.tolist() if isinstance(group_ends, torch.Tensor) else list(group_ends)
    pieces, start = [], 0
    for g, end in enumerate(ends):
        if end > start:
            pieces.append(x[start:end] @ weight[g])
        start = end
    pieces.append(x.new_zeros(x.shape[0] - start, weight.shape[2]))
    return torch.cat(pieces)


def layout_request(x: torch.Tensor, num_entries: int, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                   backend: str = "auto") -> tuple[int, int, str] | None:
    """(align, size, resolved backend) of the counted row layout ``grouped_experts`` builds on CUDA for
    ``num_entries`` entries of the rows x (N, H), so that a router can build the same layout in its own kernel
    (``route_layout_triton``); None where it would not use one (CPU, no Triton, "per_group"). ``grouped_experts``
    accepts any layout built to this request, even where it would otherwise have sorted."""
    if not x.is_cuda:
        return None
    from minimoe.model import grouped_layout_triton  # here: it loads Triton

    width = down_proj.shape[1]
    chosen = choose_backend(backend, x, [gate_up_proj[:, :, :width], gate_up_proj[:, :, width:], down_proj],
                            num_rows=num_entries)
    if chosen == "per_group" or grouped_layout_triton.triton is None:
        return None
    if chosen == "triton":  # asked for by name: say now, before the router builds a layout for it
        _check_triton(x, gate_up_proj, down_proj)
    align = row_alignment(x) if chosen == "grouped_mm_t" else 1
    return align, _padded_rows(num_entries, gate_up_proj.shape[0], align), chosen


def _padded_rows(num_entries: int, num_experts: int, align: int) -> int:
    """A static bound on the rows of the counted layout: every group padded to a multiple of ``align`` rows,
    the total rounded up to a multiple of ``align``."""
    size = num_entries + (align - 1) * num_experts
    return size + -size % align


def grouped_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor, scales_input: bool = False, backend: str = "auto",
                    has_invalid: bool = True, layout: tuple | None = None) -> torch.Tensor:
    """x (N, H), expert_ids (N, m) int64 in [0, E] (E = no expert), weights (N, m) float, gate_up_proj
    (E, H, 2F), down_proj (E, F, H) -> y (N, H) in x's dtype (see the module docstring). ``scales_input``:
    Llama 4 weights the input, Σ_j E_{e_nj}(w_nj · x_n). ``has_invalid=False`` promises that no id is E
    (skips two masks). ``layout``: (place, group_ends, source) already built for these ids as
    ``layout_request`` describes (``RoutingResult.layout``), with ``backend`` the resolved backend it names.
    "triton" runs its kernels where no entry is "no expert" and the input is not scaled (``has_invalid=False``,
    ``scales_input=False``), and torch's products otherwise. Raises ValueError for an unknown backend, and for
    "triton" where its kernels cannot run (CPU, float32, a gradient, non-contiguous rows), naming which.
    """
    num_rows, m = expert_ids.shape
    if layout is not None:
        return _grouped_experts_counted(x, expert_ids, weights, gate_up_proj, down_proj, scales_input, backend,
                                        layout)
    num_experts, width = gate_up_proj.shape[0], down_proj.shape[1]
    gate_w, up_w = gate_up_proj[:, :, :width], gate_up_proj[:, :, width:]  # (E, H, F) views
    chosen = choose_backend(backend, x, [gate_w, up_w, down_proj], num_rows=num_rows * m)
    if chosen == "triton":
        _check_triton(x, gate_up_proj, down_proj)
        if scales_input or has_invalid:  # its kernels read x unscaled, and would compute every no-expert entry
            chosen = choose_backend("auto", x, [gate_w, up_w, down_proj], num_rows * m, fused=False)
    if chosen != "per_group" and expert_ids.is_cuda:
        from minimoe.model import grouped_layout_triton  # here: it loads Triton

        if grouped_layout_triton.usable(expert_ids, num_experts):
            return _grouped_experts_counted(x, expert_ids, weights, gate_up_proj, down_proj, scales_input, chosen)
    if chosen == "triton":  # a batch too large for the counting sort: the sort below, and torch's products
        chosen = choose_backend("auto", x, [gate_w, up_w, down_proj], num_rows * m, fused=False)
    flat = expert_ids.reshape(-1)  # (P,) entry p = (row p // m, j = p % m)
    num_entries = flat.shape[0]
    sorted_ids, order = torch.sort(flat, stable=True)  # invalid entries (id E) sort last
    ends = torch.searchsorted(sorted_ids, torch.arange(1, num_experts + 1, device=x.device)).to(torch.int32)
    slot, group_ends, size = torch.arange(num_entries, device=x.device), ends, num_entries
    if chosen == "grouped_mm_t":  # every group starts at a 16-byte boundary of the (N, S) output: pad each group
        align = row_alignment(x)
        starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))  # (E,) first sorted entry of each group
        padded = (ends - starts + align - 1) // align * align  # (E,) group sizes rounded up to the alignment
        group_ends = padded.cumsum(0).to(torch.int32)  # (E,) on the device: no sync
        group = sorted_ids.clamp(max=num_experts - 1)
        within = torch.arange(num_entries, device=x.device) - starts[group]
        slot = torch.where(sorted_ids < num_experts, group_ends[group] - padded[group] + within,
                           group_ends[-1] + torch.arange(num_entries, device=x.device) - ends[-1])  # invalid: last
        size = num_entries + align * num_experts  # a static bound on the padded rows
        size += -size % align
    # sorted entry i sits in row slot[i] of the products; other rows (padding) read a zero row of x
    source = torch.full((size,), num_rows, dtype=torch.long, device=x.device).scatter_(0, slot, order.div(
        m, rounding_mode="floor"))
    rows = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, source)  # (S', H) rows in expert order
    if scales_input:
        entry_weights = weights.to(x.dtype)
        scale = entry_weights.new_zeros(size).scatter_(0, slot, entry_weights.reshape(-1)[order])
        rows = rows * scale.unsqueeze(1)
    valid = None
    if has_invalid or size > num_entries:
        # rows of no valid entry are undefined in the products, and so would be their gradients: zero them
        valid = torch.zeros(size, dtype=torch.bool, device=x.device).scatter_(0, slot, sorted_ids < num_experts)
        valid = valid.unsqueeze(1)  # (S', 1)
        rows = rows.where(valid, 0.0)
    if num_entries == 0:  # nothing to compute: an empty result that still depends on x and the weights
        out = rows
    else:
        if chosen == "per_group":
            group_ends = ends.tolist()  # per_group reads the ends on the host
        gate = grouped_matmul(rows, gate_w, group_ends, chosen)  # (S', F)
        up = grouped_matmul(rows, up_w, group_ends, chosen)  # (S', F)
        out = grouped_matmul(F.silu(gate) * up, down_proj, group_ends, chosen)  # (S', H)
        if valid is not None:  # invalid entries keep their weight in the sum below: their rows must be zeros
            out = out.where(valid, 0.0)
    place = torch.empty_like(flat).scatter_(0, order, slot)  # entry p's row among the products
    return bag_sum(place.view(num_rows, m), out, None if scales_input else weights)  # (N, H)


def _grouped_experts_counted(x, expert_ids, weights, gate_up_proj, down_proj, scales_input, chosen, layout=None):
    """``grouped_experts`` with the row layout from a counting sort on the device (``grouped_layout_triton``,
    CUDA, or the router's kernel when ``layout`` is given): two kernels instead of a sort and some twenty small
    ops; no-expert entries and padding read a zero row, so no masks. With ``grouped_mm_t`` gate and up are one
    product: its (S', 2F) output is column-major, so each half is one contiguous block."""
    num_rows, m = expert_ids.shape
    num_experts, width = gate_up_proj.shape[0], down_proj.shape[1]
    from minimoe.model import swiglu_triton

    if layout is None:
        from minimoe.model.grouped_layout_triton import grouped_layout_triton

        align = row_alignment(x) if chosen == "grouped_mm_t" else 1
        size = _padded_rows(num_rows * m, num_experts, align)
        layout = grouped_layout_triton(expert_ids, num_experts, num_rows, align, size)
    place, group_ends, source = layout
    size = source.shape[0]
    if chosen == "triton":
        _check_triton(x, gate_up_proj, down_proj)
        if not scales_input:  # two kernels, the gather and silu·mul folded in
            from minimoe.model import experts_triton

            out = experts_triton.swiglu_experts(x, source, group_ends, gate_up_proj, down_proj, num_rows * m)
            return bag_sum(place.view(num_rows, m), out, weights)  # (N, H)
        # (a layout built for "triton" has no row alignment: grouped_mm needs none)
        weight_views = [gate_up_proj[:, :, :width], gate_up_proj[:, :, width:], down_proj]
        chosen = "grouped_mm" if all(grouped_mm_supported(x, w) for w in weight_views) else "per_group"
    if bag_sum_triton.usable(source, x, None):  # one kernel; source N reads a zero row
        rows = bag_sum_triton.gather_rows(x, source)  # (S', H) in expert order
    else:
        rows = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, source)
    if scales_input:
        entry_weights = weights.to(x.dtype)
        rows = rows * entry_weights.new_zeros(size + 1).scatter_(0, place, entry_weights.reshape(-1))[:size, None]
    if chosen == "grouped_mm_t":
        gate_up = grouped_matmul(rows, gate_up_proj, group_ends, chosen).T  # (2F, S'): the product's storage
        gate, up = gate_up[:width], gate_up[width:]  # (F, S') each, contiguous
        hidden = (swiglu_triton.silu_mul(gate, up) if swiglu_triton.usable(gate, up) else F.silu(gate) * up).T
    else:
        hidden = F.silu(grouped_matmul(rows, gate_up_proj[:, :, :width], group_ends, chosen)) * grouped_matmul(
            rows, gate_up_proj[:, :, width:], group_ends, chosen)
    out = grouped_matmul(hidden, down_proj, group_ends, chosen)  # (S', H); rows past group_ends[-1] unread
    return bag_sum(place.view(num_rows, m), out, None if scales_input else weights)  # (N, H)


def bag_sum(index: torch.Tensor, table: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = Σ_j weights[i, j] · table[index[i, j]] (no weights: a plain sum): index (N, m) int64, table (S, C),
    weights (N, m) or None -> (N, C) in table's dtype. One ``embedding_bag``, a fused gather and weighted sum.
    CUDA has no bfloat16 / float16 backward for per-sample weights, so when a gradient is needed there the sum
    runs in float32 and is cast back. On CUDA without a gradient the sum runs in one Triton kernel when Triton
    is installed (``minimoe.model.bag_sum_triton``: ``embedding_bag``'s CUDA kernel is slow on wide rows)."""
    if bag_sum_triton.usable(index, table, weights):
        return bag_sum_triton.bag_sum_triton(index, table, weights)
    if (weights is not None and table.is_cuda and table.dtype in (torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and (table.requires_grad or weights.requires_grad)):
        return F.embedding_bag(index, table.float().contiguous(), mode="sum",
                               per_sample_weights=weights.float()).to(table.dtype)
    return F.embedding_bag(index, table.contiguous(), mode="sum",
                           per_sample_weights=None if weights is None else weights.to(table.dtype))
