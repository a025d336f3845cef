"""The collectives of expert parallelism: the process group, the three exchanges and their gradients.

**All-to-all with uneven splits** (MPI's ``Alltoallv``; ``torch.distributed.all_to_all_single``). Each of the
G ranks holds a buffer of rows cut into G consecutive chunks, chunk d (``send_splits[d]`` rows) meant for
rank d. After the exchange rank r holds, in rank order, the chunk every rank s cut for it
(``recv_splits[s]`` rows). The split sizes must be known *on the host* before the call, so a format that
decides on the device how many rows go where pays one host sync to learn them (:class:`CountExchange`).

**All-gather and reduce-scatter** (``all_gather_into_tensor``, ``reduce_scatter_tensor``). All-gather
concatenates every rank's (n, H) block in rank order into (G·n, H); reduce-scatter is its adjoint: from
(G·n, H) on every rank, rank r keeps the sum over ranks of block r. Every block has the same size n, so
nothing about the data has to reach the host: these two can run inside a CUDA graph. Several all-gathers
(rows, weights, slot ids) go out as one coalesced NCCL launch (:func:`gathered`).

**Gradients.** Each exchange is a linear map of rows between processes. The all-to-all is a permutation P;
its adjoint Pᵀ sends every row back where it came from, i.e. the same call with the splits swapped
(Megatron-LM and DeepSpeed wrap it so). The adjoint of all-gather is reduce-scatter and vice versa, so
:class:`AllGather` and :class:`ReduceScatter` swap the two collectives in backward. Every rank must build
the same graph: a leaf ``anchor`` that requires grad ties the outputs to it even on a rank whose inputs need
no gradient (a rank with no tokens), so every rank runs the backward collectives, in the same order.

**The one host sync of a leg.** :class:`CountExchange` exchanges a (G,) count vector with an all-to-all,
copies send and receive counts into pinned host memory without blocking, records a CUDA event, and only
``wait()`` blocks, on that event: the GPU keeps working through everything enqueued before the wait.

**One rank.** With a single rank every collective is a copy; they are skipped unless
:func:`collectives_at_one_rank` is in force (benchmarks use it to time the collectives' own cost).

**gloo.** ``all_to_all_single`` with uneven splits works; the list form of ``all_gather`` works for equal
sizes; reduce-scatter is not available on gloo in every torch release, so on gloo all-gather uses the list
form and reduce-scatter is an all-to-all of the G blocks followed by a local sum (the same bytes).

**Failing clearly.** :func:`init_process_group` sets a timeout on every collective. When a rank raises or
exits, the others' next collective fails (gloo: the peer's socket closes; a rank that never arrives: the
timeout); every collective here turns that into a ``RuntimeError`` that names the exchange, the rank and the
timeout. NCCL enforces the timeout with its watchdog, which ends the process.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0
_TIMEOUT_S: float | None = None  # the timeout init_process_group set, for error messages
_ONE_RANK_SHORTCUT = [True]  # skip collectives on a one-rank group (see collectives_at_one_rank)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---- the process group ---------------------------------------------------------------------------------
def init_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, init_method=None,
                       rank: int | None = None, world_size: int | None = None) -> torch.device:
    """Join (or create) the default process group and return this rank's device.

    backend: "gloo" (CPU tensors) or "nccl" (one CUDA device per rank); None picks NCCL when CUDA is available
    and gloo otherwise. Under ``torchrun`` the rank, world size and rendezvous come from the environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); otherwise pass
    ``init_method`` ("file:///tmp/x", "tcp://host:port"), ``rank`` and ``world_size``. ``timeout_s`` bounds
    every collective. Raises ValueError for a bad backend (or NCCL without a visible GPU) or timeout.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA GPUs and none is visible here; use 'gloo' (CPU tensors)")
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


@contextlib.contextmanager
def collectives_at_one_rank():
    """Inside this block, collectives on a one-rank group run (as local copies) instead of being skipped."""
    _ONE_RANK_SHORTCUT.append(False)
    try:
        yield
    finally:
        _ONE_RANK_SHORTCUT.pop()


def alone(group=None) -> bool:
    """True when the collectives of ``group`` can be skipped: no process group, or one rank (and the shortcut on)."""
    if not dist.is_initialized():
        return True
    return dist.get_world_size(group) == 1 and _ONE_RANK_SHORTCUT[-1]


def _gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


# ---- plain collectives (no autograd) --------------------------------------------------------------------
def all_to_all(out: torch.Tensor, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None,
               what: str = "all-to-all") -> torch.Tensor:
    """Chunk d of ``rows`` (``send_splits[d]`` rows) to rank d; ``out`` (sum(recv_splits), ...) receives, in rank
    order, the chunk every rank cut for this one. Returns ``out``. Raises RuntimeError naming ``what`` when a
    peer fails or times out. With one rank, ``out`` gets a copy of ``rows``."""
    if alone(group):
        return out.copy_(rows)
    try:
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
    except RuntimeError as error:
        raise _failed(what, group, error) from error
    return out


def all_gather_into(out: torch.Tensor, block: torch.Tensor, group=None, what: str = "all-gather") -> torch.Tensor:
    """block (n, ...) on every rank -> ``out`` (G·n, ...): the blocks in rank order. Returns ``out``."""
    if alone(group):
        return out.copy_(block)
    try:
        if _gloo(group):
            dist.all_gather(list(out.chunk(dist.get_world_size(group))), block.contiguous(), group=group)
        else:
            _all_gather_single(out, block.contiguous(), group=group)
    except RuntimeError as error:
        raise _failed(what, group, error) from error
    return out


def reduce_scatter_into(out: torch.Tensor, blocks: torch.Tensor, group=None, what: str = "reduce-scatter") -> torch.Tensor:
    """blocks (G·n, ...) on every rank -> ``out`` (n, ...) = the sum over ranks of block ``rank``. Returns ``out``.

    On gloo: an all-to-all of the G blocks (each rank sends block d to rank d, as reduce-scatter does) and a
    local sum over the G received blocks, in rank order."""
    if alone(group):
        return out.copy_(blocks)
    size = dist.get_world_size(group)
    try:
        if _gloo(group):
            received = torch.empty_like(blocks)
            dist.all_to_all_single(received, blocks.contiguous(), group=group)
            torch.sum(received.view(size, *out.shape), 0, out=out)
        else:
            _reduce_scatter_single(out, blocks.contiguous(), group=group)
    except RuntimeError as error:
        raise _failed(what, group, error) from error
    return out


def gathered(blocks: list[torch.Tensor], group=None, what: str = "all-gather") -> list[torch.Tensor]:
    """blocks[i] (n, ...) on every rank -> new (G·n, ...) tensors: each block's copies of all ranks in rank order
    (no autograd). On NCCL the all-gathers are one coalesced launch (one group of NCCL calls, one kernel), each
    tensor travelling as bytes, so blocks of any dtype (rows, weights, slot ids) cost one collective, as one
    all-gather of a packed buffer would, without the copy into it. It calls the process group's
    coalesced all-gather directly (the call ``torch.distributed._coalescing_manager`` issues when it closes),
    without the manager's per-collective Python bookkeeping (measured on an H100 host: 63 instead of 126 µs of host
    time for three blocks and a reduce-scatter). On gloo, one list-form all-gather each."""
    one = alone(group)
    size = 1 if one else dist.get_world_size(group)
    outs = [block.new_empty(size * block.shape[0], *block.shape[1:]) for block in blocks]
    coalesced = None if one or _gloo(group) else \
        getattr(dist.group.WORLD if group is None else group, "allgather_into_tensor_coalesced", None)
    if coalesced is None:
        for out, block in zip(outs, blocks):
            all_gather_into(out, block, group, what)
        return outs
    try:  # wait(): the current stream waits for NCCL's (the host does not block)
        coalesced([_as_bytes(out) for out in outs], [_as_bytes(block.contiguous()) for block in blocks]).wait()
    except RuntimeError as error:
        raise _failed(what, group, error) from error
    return outs


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor viewed as uint8 (a 0-column tensor as it is)."""
    return tensor.view(torch.uint8) if tensor.numel() else tensor


def scattered(blocks: torch.Tensor, group=None, what: str = "reduce-scatter") -> torch.Tensor:
    """blocks (G·n, ...) on every rank -> a new (n, ...) tensor: the sum over ranks of block ``rank`` (no autograd)."""
    size = 1 if alone(group) else dist.get_world_size(group)
    return reduce_scatter_into(blocks.new_empty(blocks.shape[0] // size, *blocks.shape[1:]), blocks, group, what)


def all_gather_rows(row: torch.Tensor, group=None, what: str = "all-gather") -> torch.Tensor:
    """(n,) on every rank -> (G, n): the same-size vectors of all ranks, in rank order."""
    if alone(group):
        return row.unsqueeze(0)
    return all_gather_into(row.new_empty(dist.get_world_size(group), *row.shape), row.unsqueeze(0), group, what)


def all_reduce_sum(tensor: torch.Tensor, group=None, what: str = "all-reduce") -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place, and return it."""
    if not alone(group):
        try:
            dist.all_reduce(tensor, group=group)
        except RuntimeError as error:
            raise _failed(what, group, error) from error
    return tensor


class CountExchange:
    """Tell every rank how many rows it will get, with one host sync: (G,) int64 counts on the device.

    ``CountExchange(send_counts, group)`` starts it (an all-to-all of G integers, then a non-blocking copy of
    both count vectors to pinned host memory, marked by a CUDA event); ``wait()`` blocks on that event and
    returns (send_splits, recv_splits) as host lists. Work enqueued between the two keeps the GPU busy.
    """

    def __init__(self, send_counts: torch.Tensor, group=None, what: str = "count exchange"):
        send_counts = send_counts if send_counts.dtype == torch.int64 else send_counts.to(torch.int64)
        self.size, self.alone = send_counts.numel(), alone(group)
        if self.alone:  # one rank: it receives what it sends
            both = send_counts
        else:
            both = send_counts.new_empty(2 * self.size)
            both[:self.size] = send_counts
            all_to_all(both[self.size:], send_counts, [1] * self.size, [1] * self.size, group, what)
        self.event = None
        if both.is_cuda:
            self.host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            self.host.copy_(both, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = both

    def wait(self) -> tuple[list[int], list[int]]:
        if self.event is not None:
            self.event.synchronize()  # the host sync of the leg
        both = self.host.tolist()
        return (both, both) if self.alone else (both[:self.size], both[self.size:])


# ---- the differentiable all-gather and reduce-scatter --------------------------------------------------
class AllGather(torch.autograd.Function):
    """blocks[i] (n, ...) -> (G·n, ...) all-gathered (``gathered``: one coalesced launch); backward: a
    reduce-scatter of each floating-point gradient (integer outputs, such as slot ids, have none)."""

    @staticmethod
    def forward(ctx, anchor, group, what, *blocks):
        ctx.group, ctx.what, ctx.size = group, what, 1 if alone(group) else dist.get_world_size(group)
        outs = gathered(list(blocks), group, what)
        ctx.floating = [out.is_floating_point() for out in outs]  # the same on every rank: same collectives
        ctx.mark_non_differentiable(*[out for out, floating in zip(outs, ctx.floating) if not floating])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # unused outputs arrive as zeros, so every rank runs every reduce-scatter
        return (None, None, None, *[reduce_scatter_into(
            grad.new_empty(grad.shape[0] // ctx.size, *grad.shape[1:]), grad.contiguous(), ctx.group,
            f"{ctx.what} backward") if floating else None for grad, floating in zip(grads, ctx.floating)])


class ReduceScatter(torch.autograd.Function):
    """blocks (G·n, ...) -> (n, ...) summed over ranks; backward: all-gather of the gradient."""

    @staticmethod
    def forward(ctx, blocks, anchor, group, what):
        ctx.group, ctx.what, ctx.size = group, what, 1 if alone(group) else dist.get_world_size(group)
        return scattered(blocks, group, what)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(ctx.size * grad.shape[0], *grad.shape[1:])
        return all_gather_into(out, grad.contiguous(), ctx.group, f"{ctx.what} backward"), None, None, None


def anchor(requires_grad: bool) -> torch.Tensor | None:
    """A leaf that requires grad (or None): passed to an exchange, it puts the outputs in the autograd graph on
    every rank, so every rank runs the backward collectives (``requires_grad`` must agree across ranks)."""
    return torch.zeros((), requires_grad=True) if requires_grad else None
