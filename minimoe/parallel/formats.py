"""Which wire format to use: the expected distinct ranks per token ρ against G, and whether the step is captured.

With G ranks, a token's k experts live on ρ distinct ranks on average. For uniform routing over E experts
spread evenly (chapter 6 derives the same formula for nodes):

    ρ = G · (1 − C(E − E/G, k) / C(E, k))

Per leg, ``token_rank`` sends a token to the ρ·(G−1)/G other ranks it needs on average; ``replicate`` sends
it to all G−1. So replicate moves G/ρ times the bytes, but it needs no count exchange and no pack, no host
sync once every rank's token count is known, and its shapes are fixed, so a CUDA graph can capture it. ``token_rank`` with ``static=True`` is the other
capturable path, and the dearer one: it moves the same G rows per token, each with k entries of metadata, and
packs them. For DeepSeek-V3's 256 experts and top-8: ρ = 1.99 at G = 2 (G/ρ = 1.00), 3.61 at
G = 4 (1.11), 5.29 at G = 8 (1.51): on 8 GPUs the fixed path sends half again the rows, whatever the routing.

The rule (``choose_wire_format``):

1. the step is captured in a CUDA graph -> ``replicate``;
2. one rank -> ``replicate`` (nothing moves, nothing to count);
3. G/ρ ≤ 1 + ``max_extra_bytes`` (25 % by default) -> ``replicate``: a host sync costs more than that much
   extra traffic at the sizes where the sync matters;
4. several nodes of several GPUs -> ``hierarchical`` (one copy per remote node crosses the slow link; its two
   legs run one after the other, each with its own sync);
5. otherwise ``token_rank``.

Routing that is not uniform (locality placement, correlated experts) lowers ρ and favours the all-to-all
formats more; pass the measured ρ (e.g. ``TrafficReport.remote_ranks_per_token`` + the local fraction) as
``rho`` to decide on a real trace.
"""
from __future__ import annotations

from dataclasses import dataclass

from minimoe.placement.traffic import uniform_nodes_per_token


@dataclass(frozen=True)
class FormatChoice:
    """The chosen ``wire_format``, the ``reason`` in words, ρ and G it was decided on."""

    wire_format: str
    reason: str
    rho: float
    num_gpus: int

    @property
    def bytes_ratio(self) -> float:
        """Bytes of ``replicate`` over bytes of ``token_rank`` (G/ρ)."""
        return self.num_gpus / self.rho if self.rho > 0 else float("inf")


def expected_ranks_per_token(num_experts: int, top_k: int, num_gpus: int) -> float:
    """ρ for uniform routing: G · (1 − C(E − E/G, k) / C(E, k)) (experts spread as evenly as possible)."""
    return uniform_nodes_per_token(num_experts, top_k, num_gpus)


def choose_wire_format(num_experts: int, top_k: int, num_gpus: int, gpus_per_node: int | None = None,
                       graph: bool = False, max_extra_bytes: float = 0.25, rho: float | None = None) -> FormatChoice:
    """The wire format for E experts, top-k, G ranks (``gpus_per_node`` per node, default all on one node),
    ``graph``: whether the step is captured in a CUDA graph. ``rho``: distinct ranks per token, if measured.
    Raises ValueError for impossible sizes (see ``uniform_nodes_per_token``), a ``gpus_per_node`` that does not
    divide ``num_gpus``, a ``rho`` outside [1, min(G, top_k)] or a negative ``max_extra_bytes``."""
    if not max_extra_bytes >= 0:
        raise ValueError(f"max_extra_bytes must be >= 0, got {max_extra_bytes!r}")
    gpus_per_node = num_gpus if gpus_per_node is None else gpus_per_node
    for name, value in (("num_gpus", num_gpus), ("gpus_per_node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if num_gpus % gpus_per_node:
        raise ValueError(f"gpus_per_node={gpus_per_node} does not divide num_gpus={num_gpus} into whole nodes")
    if rho is not None and not 1 <= float(rho) <= min(num_gpus, top_k):  # NaN fails too
        raise ValueError(f"rho must be a number of distinct ranks per token in [1, min(num_gpus, top_k) = "
                         f"{min(num_gpus, top_k)}], got {rho!r}")
    if num_gpus == 1:
        return FormatChoice("replicate", "one rank: nothing moves", 1.0, 1)
    rho = expected_ranks_per_token(num_experts, top_k, min(num_gpus, num_experts)) if rho is None else float(rho)
    ratio = num_gpus / rho
    said = f"rho = {rho:.2f} distinct ranks per token of G = {num_gpus}: replicate moves {ratio:.2f}x the rows"
    if graph:
        return FormatChoice("replicate", f"captured in a CUDA graph: fixed shapes, no host sync ({said})", rho,
                            num_gpus)
    if ratio <= 1 + max_extra_bytes:
        return FormatChoice("replicate", f"{said}, at most {1 + max_extra_bytes:.2f}x: no count exchange, no host "
                                         "sync", rho, num_gpus)
    if 1 < gpus_per_node < num_gpus:
        return FormatChoice("hierarchical", f"{said}; {num_gpus // gpus_per_node} nodes of {gpus_per_node}: one "
                                            "copy per remote node", rho, num_gpus)
    return FormatChoice("token_rank", f"{said}: send each token only where it is needed (one host sync)", rho,
                        num_gpus)
