"""Expert placement methods: :func:`place` fits a ``Placement`` (``minimoe.placement.phy2log``) per layer on a
trace's routing.

* ``contiguous``  expert ``e`` on GPU ``floor(e * G / E)`` (what engines do by default);
* ``round_robin`` expert ``e`` on GPU ``e % G``;
  both fill spare slots with copies of the experts with the highest load per replica, in GPU order;
* ``eplb``        DeepSeek's load balancer (``minimoe.placement.eplb``), on the trace's per-expert token counts;
* ``locality``    co-activation and demand aware placement (``minimoe.placement.locality``): a km1 hypergraph
                  partition of the experts onto nodes (``partitioner``: ``"auto"``, the default: both of
                  ``"fm"``, ours, and ``"mtkahypar"``, the optional Mt-KaHyPar library, when it is installed,
                  keeping the lower km1), then replicas and GPUs.
"""
from __future__ import annotations

import numpy as np

from minimoe.placement.eplb import eplb, eplb_numpy, replicate_experts  # noqa: F401  (eplb is an entry point)
from minimoe.placement.fitdata import FitData
from minimoe.placement.locality import place_locality
from minimoe.placement.phy2log import Placement
from minimoe.placement.topology import Topology

METHODS = ("contiguous", "round_robin", "eplb", "locality")
MAX_SLOTS_PER_EXPERT = 8  # num_replicas: at most this many copies of each expert, or one on every GPU


# ---- fitting data ---------------------------------------------------------------------------------------
def trace_loads(trace, tokens=None) -> np.ndarray:
    """(L, E) float64 number of tokens routed to each expert (over the selected tokens)."""
    experts = trace.experts if tokens is None else trace.experts[tokens]
    num_layers, num_experts = experts.shape[1], trace.num_experts
    layer_of = np.broadcast_to(np.arange(num_layers)[None, :, None], experts.shape)
    valid = experts >= 0
    flat = (layer_of[valid].astype(np.int64) * num_experts + experts[valid])
    return np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts).astype(float)


def _check_trace(trace, num_experts):
    for attribute in ("experts", "request", "num_experts", "top_k"):
        if not hasattr(trace, attribute):
            raise TypeError(f"trace must be a minimoe.traces.format.Trace, got {type(trace).__name__}")
    if num_experts is not None and num_experts != trace.num_experts:
        raise ValueError(f"num_experts={num_experts} does not match the trace's num_experts={trace.num_experts}")
    if trace.experts.size and int(trace.experts.max()) >= trace.num_experts:
        raise ValueError(f"trace routes to expert {int(trace.experts.max())} but declares "
                         f"num_experts={trace.num_experts}")


def _static_layout(num_layers, num_experts, topology, num_slots, loads, method):
    num_gpus = topology.num_gpus
    slots_per_gpu = num_slots // num_gpus
    experts = np.arange(num_experts)
    primary_gpu = experts * num_gpus // num_experts if method == "contiguous" else experts % num_gpus
    phy2log = np.empty((num_layers, num_slots), dtype=np.int64)
    for layer in range(num_layers):
        slot2log, _, _ = replicate_experts(loads[layer][None], num_slots)  # extra slots: hottest per replica
        extras = slot2log[0, num_experts:]
        gpu_lists = [list(experts[primary_gpu == gpu]) for gpu in range(num_gpus)]
        free = [gpu for gpu in range(num_gpus) for _ in range(slots_per_gpu - len(gpu_lists[gpu]))]
        for gpu, expert in zip(free, extras):
            gpu_lists[gpu].append(int(expert))
        phy2log[layer] = np.concatenate([sorted(lst) for lst in gpu_lists])
    return phy2log


def place(trace, topology: Topology, method: str = "locality", **options) -> Placement:
    """Place every layer's experts on ``topology``; see the module docstring for the methods.

    ``trace`` is a Trace or a ``minimoe.placement.fitdata.FitData`` (exact loads, sampled hyperedges: how
    traces larger than memory are fitted). Common options: ``num_replicas`` (physical slots per layer,
    default ``num_experts`` or
    ``topology.slots_per_gpu * num_gpus``), ``tokens`` (bool (N,) mask of the tokens to fit on),
    ``num_experts`` (checked against the trace), ``sources`` (per-request GPU rank from
    ``minimoe.placement.grouping``; only ``locality`` uses it, the other methods do not depend on sources).
    ``eplb``: ``policy`` ("global" | "hierarchical" | "auto", default "auto" = hierarchical when
    ``num_groups`` is a multiple of the node count) and ``num_groups`` (default 1). ``locality``:
    ``epsilon``, ``rounds``, ``locality_replicas``, ``max_fit_tokens``, ``partitioner`` ("auto" | "fm" | "mtkahypar"),
    ``seed``, ``restarts``, ``mtkahypar_preset``, ``cache`` (``minimoe.placement.locality.place_locality``).
    Raises ValueError for an unknown method or option, or ``num_replicas`` above num_experts x max(num_gpus,
    ``MAX_SLOTS_PER_EXPERT``), ImportError when ``partitioner="mtkahypar"`` and the
    optional Mt-KaHyPar package is missing (the message says how to install it).
    """
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be a minimoe.placement.topology.Topology, got {type(topology).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown placement method {method!r}; expected one of {list(METHODS)}")
    _check_trace(trace, options.pop("num_experts", None))
    num_experts, num_layers = trace.num_experts, trace.experts.shape[1]
    num_slots = topology.num_slots(options.pop("num_replicas", None), num_experts)
    most = max(num_experts * topology.num_gpus, MAX_SLOTS_PER_EXPERT * num_experts)
    if num_slots > most:  # more only slows the fits (EPLB, locality) down
        raise ValueError(f"num_replicas={num_slots}: expected at most {most} physical slots per layer (every GPU "
                         f"holding each of the {num_experts} experts, or {MAX_SLOTS_PER_EXPERT} copies of each)")
    tokens = options.pop("tokens", None)
    if tokens is not None:
        tokens = np.asarray(tokens)
        if tokens.dtype != bool or tokens.shape != (trace.experts.shape[0],):
            raise ValueError(f"tokens must be a bool mask of shape ({trace.experts.shape[0]},), "
                             f"got dtype {tokens.dtype} shape {tokens.shape}")
    if isinstance(trace, FitData):  # exact loads, sampled tokens
        if tokens is not None and not tokens.all():
            raise ValueError("a FitData holds only fitting tokens: tokens must be None or all True")
        loads = trace.loads()
    else:
        loads = trace_loads(trace, tokens)
    grid = (topology.num_nodes, topology.gpus_per_node)
    sources = options.pop("sources", None)
    allowed = dict(eplb={"policy", "num_groups"},
                   locality={"epsilon", "rounds", "locality_replicas", "max_fit_tokens", "partitioner", "seed", "restarts",
                                 "mtkahypar_preset", "cache"}).get(method, set())
    if set(options) - allowed:
        raise ValueError(f"unknown options {sorted(set(options) - allowed)} for method {method!r}; "
                         f"expected some of {sorted(allowed | {'num_replicas', 'tokens', 'sources', 'num_experts'})}")

    if method in ("contiguous", "round_robin"):
        phy2log = _static_layout(num_layers, num_experts, topology, num_slots, loads, method)
    elif method == "eplb":
        policy = options.pop("policy", "auto")
        num_groups = options.pop("num_groups", 1)
        if policy not in ("auto", "global", "hierarchical"):
            raise ValueError(f"eplb policy must be 'auto', 'global' or 'hierarchical', got {policy!r}")
        if policy == "global":
            num_groups, nodes = 1, 1
        else:
            nodes = topology.num_nodes
            if policy == "hierarchical" and num_groups % nodes:
                raise ValueError(f"hierarchical eplb needs num_groups={num_groups} to be a multiple of "
                                 f"num_nodes={nodes}")
        phy2log, _, _ = eplb_numpy(loads, num_slots, num_groups, nodes, topology.num_gpus)
    else:
        phy2log = place_locality(trace, topology, num_slots, sources=sources, tokens=tokens, **options)
    return Placement(phy2log, num_experts, *grid, method=method)
