"""The expert-parallel MoE layer: ``minimoe.model.MoELayer`` with its experts spread over ranks.

Every rank holds the router and the shared expert (replicated, like the attention layers) and only the
expert slots its ``Placement`` gives it: slots [r·S, (r+1)·S) of the layer, S = slots_per_gpu, each a
copy of the logical expert ``phy2log[layer, slot]`` (replicas are copies). A forward on rank r is

    routing = router(x)                                   (T, k) experts and weights, as MoELayer
    kept    = capacity over the ranks' concatenated batch (minimoe.parallel.routing.capacity_kept)
    slots   = Placement.route(experts, r, token_index)     (the replica rule of the traffic accounting)
    rows    = dispatch(x, slots, weights)                 (minimoe.parallel.dispatch, in one wire format)
    y_rows  = local experts on rows                       (minimoe.parallel.experts)
    y       = combine(y_rows) + shared(x)

so with the ranks' batches concatenated in rank order, y equals ``MoELayer`` on the whole batch, and so do
the gradients: of x, of the router (summed over ranks, as data parallelism does), and of each expert
(summed over its replicas; :meth:`ExpertParallelMoE.gather_experts`). ``aux_loss`` is computed on the rank's
own tokens. Training with replicas needs their gradients summed before the optimizer step.

``wire_format="auto"`` picks the format with ``minimoe.parallel.formats.choose_wire_format`` (ρ against G, and
``static``: fixed shapes for a CUDA graph); ``format_choice`` says which and why. Host syncs per forward: none
with ``replicate`` when every rank's token count is known (``static``, or ``tokens_per_rank`` passed to
forward; else one small all-gather agrees on it), one with ``token_rank`` and ``token_expert``, two with
``hierarchical`` (one on a single node), plus one in the first forward of each input size (the configuration
check). The capacity mask is computed on the device; ``dropped_tokens`` syncs only when read.

:func:`expert_parallel` swaps every ``MoELayer`` of a ``minimoe.model.Transformer`` for this layer (MoE
layer i uses placement layer i), so a whole model runs expert-parallel.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from minimoe.model.moe import MoELayer
from minimoe.model.aux_losses import load_balancing_loss, router_probabilities, router_z_loss
from minimoe.parallel.checks import check_fingerprint, fingerprint
from minimoe.parallel.comm import all_reduce_sum, group_rank_size
from minimoe.parallel.counters import TrafficCounters
from minimoe.parallel.dispatch import WIRE_FORMATS, combine, dispatch
from minimoe.parallel.experts import local_experts
from minimoe.parallel.formats import FormatChoice, choose_wire_format
from minimoe.parallel.routing import RouteTable, capacity_kept


class ExpertParallelMoE(nn.Module):
    """An expert-parallel copy of ``moe`` on this rank of ``group``. forward: (B, T, H) or (T, H) -> same.

    placement: a ``minimoe.placement.Placement`` for ``group``'s size; layer: its layer index for this MoE
    layer; wire_format: one of ``WIRE_FORMATS`` or "auto" (``format_choice`` records the choice and why).
    ``counters`` (``TrafficCounters``) accumulate this rank's sent bytes over forwards; ``static``
    (``replicate`` or ``token_rank``, dropless): fixed shapes and no host sync, for decode under a CUDA graph
    (every rank must bring the same number of tokens, checked once per size). Raises ValueError when the
    placement does not fit the layer or the group, or for an unknown format.
    """

    def __init__(self, moe: MoELayer, placement, layer: int = 0, group=None, wire_format: str = "auto",
                 static: bool = False):
        super().__init__()
        if not isinstance(moe, MoELayer):
            raise TypeError(f"moe must be a minimoe.model.MoELayer, got {type(moe).__name__}")
        if wire_format not in (*WIRE_FORMATS, "auto"):
            raise ValueError(f"wire_format must be one of {WIRE_FORMATS} or 'auto', got {wire_format!r}")
        rank, size = group_rank_size(group)
        if placement.num_gpus != size:
            raise ValueError(f"the placement is for {placement.num_gpus} GPUs ({placement.num_nodes} nodes x "
                             f"{placement.gpus_per_node}) but the process group has {size} ranks")
        if placement.num_experts != moe.config.num_experts:
            raise ValueError(f"the placement has {placement.num_experts} experts, the MoE layer "
                             f"{moe.config.num_experts}")
        self.hidden_size, self.config, self.group, self.rank = moe.hidden_size, moe.config, group, rank
        if wire_format == "auto":
            self.format_choice = choose_wire_format(moe.config.num_experts, moe.config.top_k, size,
                                                    placement.gpus_per_node, graph=static)
            wire_format = self.format_choice.wire_format
        else:
            self.format_choice = FormatChoice(wire_format, "chosen by the caller", float("nan"), size)
        if static and (wire_format not in ("replicate", "token_rank") or moe.config.capacity_factor > 0):
            raise ValueError(f"static=True (fixed shapes for decode) needs wire_format 'replicate' or 'token_rank' "
                             f"and a dropless layer, got {wire_format!r} and capacity_factor="
                             f"{moe.config.capacity_factor}")
        self.placement, self.layer, self.wire_format, self.static = placement, layer, wire_format, static
        self.route_table = RouteTable(placement, layer, device=moe.gate_up_proj.device)
        spg = placement.slots_per_gpu
        local = self.route_table.slot_experts[rank * spg:(rank + 1) * spg]  # (S,) logical expert of each slot
        self.register_buffer("slot_experts", local.clone(), persistent=False)
        self.router = copy.deepcopy(moe.router)
        self.shared_expert = copy.deepcopy(moe.shared_expert)
        self.gate_up_proj = nn.Parameter(moe.gate_up_proj.detach()[local].clone())  # (S, H, 2F)
        self.down_proj = nn.Parameter(moe.down_proj.detach()[local].clone())  # (S, F, H)
        self.grouped_backend = "auto"
        self.timed = False  # True: synchronise the device around each stage and record last_times (seconds)
        self.last_times: dict = {}
        self.counters = TrafficCounters()
        self._checked: set = set()
        self.last_routing = self.last_kept = self.capacity = self.received_pairs = None
        self._dropped = None
        self.aux_loss = torch.zeros(())

    @property
    def dropped_tokens(self) -> int:
        """(token, expert) pairs the capacity dropped in the last forward (reading it syncs with the device)."""
        return 0 if self._dropped is None else int(self._dropped)

    def forward(self, x: torch.Tensor, token_index: torch.Tensor | None = None,
                tokens_per_rank: list[int] | None = None) -> torch.Tensor:
        """x (B, T, H) or (T, H); token_index (B·T,) int picks among equally near replicas (default 0..T-1);
        tokens_per_rank: every rank's B·T, if the caller knows them (``replicate`` then needs no agreement)."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ExpertParallelMoE expects (B, T, {self.hidden_size}) or (T, {self.hidden_size}), "
                             f"got {shape}")
        if x.dtype != self.gate_up_proj.dtype:
            raise TypeError(f"input dtype {x.dtype} differs from the expert weights' dtype {self.gate_up_proj.dtype}")
        tokens = x.reshape(-1, self.hidden_size)  # (T, H)
        self._agree(tokens)
        cfg = self.config
        routing = self.router(tokens)
        kept, self.capacity = capacity_kept(routing.expert_ids, cfg.num_experts, cfg.top_k, cfg.capacity_factor,
                                            self.group)
        expert_ids = routing.expert_ids if kept is None else routing.expert_ids.masked_fill(~kept, -1)
        if token_index is None:
            token_index = torch.arange(tokens.shape[0], device=tokens.device)
        if self.route_table.cand.device != tokens.device:
            self.route_table.to(tokens.device)
        slots = self.route_table.route(expert_ids, self.rank, token_index)  # (T, k) global slots
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        clock = _Clock(tokens.device, self.timed)
        sent = dispatch(tokens, slots, routing.weights, self.route_table, self.wire_format, self.group,
                        self.counters, needs_grad, self.static, tokens_per_rank)
        clock.lap("dispatch")
        expert_out = local_experts(sent.rows, sent.slots, sent.weights, self.gate_up_proj, self.down_proj,
                                   routing.scales_input, self.grouped_backend)  # (N, H)
        clock.lap("experts")
        out = combine(expert_out, sent.handle)  # (T, H)
        clock.lap("combine")
        self.last_times = clock.laps
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        self.last_routing, self.last_kept = routing, kept
        self.received_pairs = (sent.slots >= 0).sum()  # a tensor: reading it syncs with the device
        self._dropped = None if kept is None else (~kept).sum()
        self.aux_loss = self._aux_loss(routing, tokens.device)
        return out.reshape(x.shape)

    def _agree(self, tokens: torch.Tensor) -> None:
        key = (tokens.dtype, tokens.shape[1], tokens.shape[0] if self.static else None)
        if key in self._checked:
            return
        _, size = group_rank_size(self.group)
        fields = fingerprint(self.config.num_experts, self.config.top_k, tokens.shape[1], tokens.dtype,
                             self.placement, self.layer, size, WIRE_FORMATS.index(self.wire_format),
                             self.config.capacity_factor)
        if self.static:  # fixed shapes: every rank must bring the same number of tokens
            fields["tokens per rank (static)"] = tokens.shape[0]
        check_fingerprint(fields, self.group, tokens.device, f"expert-parallel MoE layer {self.layer}")
        self._checked.add(key)

    def _aux_loss(self, routing, device) -> torch.Tensor:
        cfg, loss = self.config, torch.zeros((), device=device)
        if cfg.aux_loss_coef > 0:
            loss = loss + cfg.aux_loss_coef * load_balancing_loss(router_probabilities(routing), routing.expert_ids,
                                                                  cfg.num_experts)
        if cfg.z_loss_coef > 0:
            loss = loss + cfg.z_loss_coef * router_z_loss(routing.logits)
        return loss

    def gather_experts(self, grads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank gets the full (E, H, 2F) and (E, F, H) expert tensors (a collective).

        ``grads=False``: the weights (replicas averaged, so equal copies give the weights back); True: their
        gradients summed over replicas (zero for a slot that received no tokens).
        """
        num_experts = self.config.num_experts
        counts = torch.bincount(self.route_table.slot_experts, minlength=num_experts).to(self.gate_up_proj.dtype)
        out = []
        for param in (self.gate_up_proj, self.down_proj):
            local = param.grad if grads else param.detach()
            local = torch.zeros_like(param) if local is None else local
            if not grads:
                local = local / counts[self.slot_experts].view(-1, 1, 1)
            full = local.new_zeros(num_experts, *param.shape[1:]).index_add_(0, self.slot_experts, local)
            out.append(all_reduce_sum(full, self.group, "expert gather"))
        return out[0], out[1]

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={self.hidden_size}, num_experts={c.num_experts}, top_k={c.top_k}, "
                f"local_slots={self.slot_experts.tolist()}, wire_format={self.wire_format!r}")


class _Clock:
    """Seconds per stage, with a device sync before each reading (only when ``enabled``)."""

    def __init__(self, device, enabled: bool):
        self.device, self.enabled, self.laps = device, enabled, {}
        self.start = self._now() if enabled else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.enabled:
            now = self._now()
            self.laps[name], self.start = now - self.start, now


def expert_parallel(model: nn.Module, placement, group=None, wire_format: str = "auto",
                    static: bool = False) -> nn.Module:
    """Replace every ``MoELayer`` of ``model`` (a minimoe Transformer) with an ``ExpertParallelMoE``, in place.

    The i-th MoE layer (in layer order) uses placement layer i; the placement must have one layer per MoE
    layer; ``wire_format`` and ``static`` as ``ExpertParallelMoE``. Returns the model.
    """
    blocks = [block for block in model.layers if isinstance(getattr(block, "ffn", None), MoELayer)]
    if len(blocks) != placement.num_layers:
        raise ValueError(f"the model has {len(blocks)} MoE layers but the placement has {placement.num_layers}")
    for index, block in enumerate(blocks):
        block.ffn = ExpertParallelMoE(block.ffn, placement, index, group, wire_format, static)
    return model
