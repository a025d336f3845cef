"""The collectives of expert parallelism: the process group, the uneven all-to-all, and its gradient.

**All-to-all with uneven splits** (MPI's ``Alltoallv``; ``torch.distributed.all_to_all_single``). Each of the
G ranks holds a buffer of rows cut into G consecutive chunks, chunk d (``send_splits[d]`` rows) meant for
rank d. After the exchange rank r holds, in rank order, the chunk every rank s cut for it
(``recv_splits[s]`` rows). A rank may send or receive zero rows; it still takes part, because a collective
completes only when every rank of the group has called it (skipping one is the classic expert-parallel hang).

**Its gradient.** The exchange is a permutation of rows between processes, a linear map P. Its adjoint
Pᵀ sends every row back where it came from: the same call with the splits swapped. So the backward of
``y = A2A(x; send, recv)`` is ``dx = A2A(dy; recv, send)`` (Megatron-LM and DeepSpeed wrap the call in a
custom autograd function the same way). :class:`Exchange` moves a leg's token rows together with their
routing metadata (float32 weights, which are differentiable, and integer slot ids, which are not) in ONE
autograd node, so the backward runs its exchanges in one fixed order on every rank; in the forward they
travel in one packed byte buffer, so a leg is one all-to-all.

Every rank must build the same graph: when gradients are wanted, ``Exchange`` is given a leaf ``anchor``
that requires grad, so its outputs join the graph even on a rank whose own rows do not (a rank with no
tokens), and every rank calls the reverse exchange in backward. All ranks must call ``backward``.

**Failing clearly.** :func:`init_process_group` sets a timeout on every collective. When a rank raises or
exits, the others' next collective fails (gloo: the peer's socket closes; a rank that never arrives: the
timeout); :func:`all_to_all` turns that into a ``RuntimeError`` that names the exchange, the rank and the
timeout. NCCL enforces the timeout with its watchdog, which ends the process.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0
_TIMEOUT_S: float | None = None  # the timeout init_process_group set, for error messages


# ---- the process group ---------------------------------------------------------------------------------
def init_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, init_method=None,
                       rank: int | None = None, world_size: int | None = None) -> torch.device:
    """Join (or create) the default process group and return this rank's device.

    backend: "gloo" (CPU tensors) or "nccl" (one CUDA device per rank); None picks NCCL when CUDA is available
    and gloo otherwise. Under ``torchrun`` the rank, world size and rendezvous come from the environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); otherwise pass
    ``init_method`` ("file:///tmp/x", "tcp://host:port"), ``rank`` and ``world_size``. ``timeout_s`` bounds
    every collective. Raises ValueError for a bad backend or timeout.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    global _TIMEOUT_S
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank or 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        options = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if init_method is not None:
            options.update(init_method=init_method, rank=rank, world_size=world_size)
        if backend == "nccl":
            options["device_id"] = device
        dist.init_process_group(**options)
        _TIMEOUT_S = float(timeout_s)
    return device


def destroy_process_group() -> None:
    """Leave the default process group (always call it: a process that skips it may abort at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def group_rank_size(group=None) -> tuple[int, int]:
    """(this rank's index in ``group``, the group's size); (0, 1) when no process group exists."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _timeout_s(group) -> str:
    if _TIMEOUT_S is not None and (group is None or group is dist.group.WORLD):
        return f"{_TIMEOUT_S:g} s"
    return "the timeout the group was created with"


def _failed(what: str, group, error: Exception) -> RuntimeError:
    rank, size = group_rank_size(group)
    return RuntimeError(f"expert-parallel {what} failed on rank {rank} of {size}: another rank raised, exited or "
                        f"did not join this collective within the process-group timeout ({_timeout_s(group)}). "
                        f"Cause: {error}")


# ---- plain collectives (no autograd) --------------------------------------------------------------------
def all_to_all(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None,
               what: str = "all-to-all", pad_rows: int = 0) -> torch.Tensor:
    """Rows (sum(send_splits), ...) -> (sum(recv_splits) + pad_rows, ...): chunk d of ``rows`` goes to rank d;
    ``pad_rows`` zero rows follow the received ones (a row that gathers can point at for "nothing").

    With one rank (or no process group) the rows stay where they are. Raises RuntimeError naming ``what`` when
    a peer fails or times out.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return torch.cat([rows, rows.new_zeros(pad_rows, *rows.shape[1:])]) if pad_rows else rows
    received = sum(recv_splits)
    out = rows.new_empty((received + pad_rows, *rows.shape[1:]))
    if pad_rows:
        out[received:].zero_()
    try:
        dist.all_to_all_single(out[:received], rows.contiguous(), recv_splits, send_splits, group=group)
    except RuntimeError as error:
        raise _failed(what, group, error) from error
    return out


def exchange_counts(send_counts: torch.Tensor, group=None) -> tuple[list[int], list[int]]:
    """Tell every rank how many rows it will get: (G,) counts -> (send_splits, recv_splits) as host lists.

    One all-to-all of G integers, then one copy to the host (the only host sync of a leg: the row exchange
    needs its sizes on the host).
    """
    send_counts = send_counts.to(torch.int64)
    recv_counts = all_to_all(send_counts, [1] * len(send_counts), [1] * len(send_counts), group, "count exchange")
    both = torch.cat([send_counts, recv_counts]).tolist()
    return both[:len(send_counts)], both[len(send_counts):]


def all_gather_rows(row: torch.Tensor, group=None, what: str = "all-gather") -> torch.Tensor:
    """(n,) on every rank -> (G, n): the same-size vectors of all ranks, in rank order (gloo-safe)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return row.unsqueeze(0)
    parts = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(parts, row.contiguous(), group=group)
    except RuntimeError as error:
        raise _failed(what, group, error) from error
    return torch.stack(parts)


def all_reduce_sum(tensor: torch.Tensor, group=None, what: str = "all-reduce") -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place, and return it."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        try:
            dist.all_reduce(tensor, group=group)
        except RuntimeError as error:
            raise _failed(what, group, error) from error
    return tensor


# ---- the differentiable exchange ------------------------------------------------------------------------
def _layout(specs: list[tuple[torch.dtype, int]]) -> tuple[list[int], int]:
    """Byte offset of each (dtype, columns) part in a packed row (8-byte aligned) and the row width (16-aligned)."""
    offsets, width = [], 0
    for dtype, columns in specs:
        width = -(-width // 8) * 8
        offsets.append(width)
        width += columns * torch.empty((), dtype=dtype).element_size()
    return offsets, -(-width // 16) * 16


def packed_all_to_all(parts: list[tuple[torch.Tensor, torch.Tensor | None]], send_splits, recv_splits, group=None,
                      what: str = "all-to-all") -> list[torch.Tensor]:
    """Exchange several row-aligned tensors in ONE all-to-all: each row of a byte buffer holds row n of every part.

    parts: (tensor (R, c), index (N,) or None): row n of the part is ``tensor[index[n]]`` (gathered straight
    into the buffer) or ``tensor[n]``. Returns one (N', c) view per part into the received buffer.
    """
    specs = [(t.dtype, t.shape[1]) for t, _ in parts]
    offsets, width = _layout(specs)
    first, index = parts[0]
    rows = first.shape[0] if index is None else index.shape[0]
    buffer = torch.empty(rows, width, dtype=torch.uint8, device=first.device)
    size = [torch.empty((), dtype=d).element_size() for d, _ in specs]
    for (tensor, index), offset, (dtype, columns), nbytes in zip(parts, offsets, specs, size):
        view = buffer[:, offset:offset + columns * nbytes].view(dtype)  # (N, c), strided
        if index is None:
            view.copy_(tensor)
        else:
            torch.index_select(tensor, 0, index, out=view)
    out = all_to_all(buffer, send_splits, recv_splits, group, what)
    return [out[:, o:o + c * b].view(d) for o, (d, c), b in zip(offsets, specs, size)]


class Exchange(torch.autograd.Function):
    """One leg of dispatch or combine: rows of x, and optionally their routing metadata, to other ranks.

    forward(x (R, H), src_row (N,) int64 or None, weights (N, m) float32 or None, slots (N, m) int or None,
    send_splits, recv_splits, group, what, anchor, pad_rows) -> (x[src_row] exchanged: (N', H), plus
    ``pad_rows`` zero rows when there is no metadata; weights (N', m) float32 or None; slots (N', m) int64 or
    None). With metadata, the gather writes into one packed buffer and a single all-to-all moves everything.
    backward: the same exchange with the splits swapped, for the rows' gradient and then the weights' (two
    all-to-alls in that order, on every rank), and the gather's adjoint (index_add into x's rows).
    """

    @staticmethod
    def forward(ctx, x, src_row, weights, slots, send_splits, recv_splits, group, what, anchor, pad_rows=0):
        ctx.splits, ctx.group, ctx.what, ctx.pad_rows = (send_splits, recv_splits), group, what, pad_rows
        ctx.has_weights, ctx.num_rows = weights is not None, x.shape[0]
        ctx.save_for_backward(src_row)
        if weights is None:
            rows = x if src_row is None else x.index_select(0, src_row)
            return all_to_all(rows, send_splits, recv_splits, group, f"{what} (rows)", pad_rows), None, None
        out_rows, out_weights, out_slots = packed_all_to_all(
            [(x, src_row), (weights.float(), None), (slots.to(torch.int32), None)], send_splits, recv_splits,
            group, what)
        out_slots = out_slots.to(torch.int64)
        ctx.mark_non_differentiable(out_slots)
        return out_rows, out_weights, out_slots

    @staticmethod
    def backward(ctx, grad_rows, grad_weights, _grad_slots):
        send, recv = ctx.splits
        (src_row,) = ctx.saved_tensors
        grad_rows = grad_rows[:grad_rows.shape[0] - ctx.pad_rows]  # the zero rows were no one's
        grad_x = all_to_all(grad_rows.contiguous(), recv, send, ctx.group, f"{ctx.what} backward (rows)")
        if src_row is not None:
            grad_x = grad_x.new_zeros(ctx.num_rows, grad_x.shape[1]).index_add_(0, src_row, grad_x)
        grad_w = None
        if ctx.has_weights:
            grad_w = all_to_all(grad_weights.contiguous(), recv, send, ctx.group, f"{ctx.what} backward (weights)")
        return grad_x, None, grad_w, None, None, None, None, None, None, None


def exchange(x, send_splits, recv_splits, group=None, src_row=None, weights=None, slots=None, requires_grad=False,
             what="exchange", pad_rows: int = 0):
    """Differentiable all-to-all of ``x[src_row]`` (all of x when src_row is None) and routing metadata; see
    :class:`Exchange`. ``requires_grad`` must be the same on every rank: True ties the outputs to the autograd
    graph even where the local inputs need no gradient, so every rank runs the reverse exchange in backward.
    """
    anchor = torch.zeros((), requires_grad=True) if requires_grad else None
    if weights is not None and (slots is None or weights.shape != slots.shape):
        raise ValueError(f"weights and slots must have the same shape (N, m), got {tuple(weights.shape)} and "
                         f"{None if slots is None else tuple(slots.shape)}")
    return Exchange.apply(x, src_row, weights, slots, send_splits, recv_splits, group, what, anchor, pad_rows)
