"""What ``minimoe ep-demo`` runs on: the "nodes", and the placement (a fitted method or a saved file).

**Nodes.** ``--gpus-per-node`` groups consecutive ranks into nodes. By default the ranks form two nodes when
there are four or more (an even number), and each rank is its own node otherwise, so that some traffic
crosses a node boundary and the placements differ in it (with every rank on one node, every inter-node figure
is 0). On one host these are only labels: the bytes are counted per link class, the links are the host's.

**Placement.** ``--placement`` takes every fit ``minimoe report`` measures (``minimoe.placement.experiments``:
contiguous, round_robin, eplb, locality, grouping, grouping+locality), fitted on the routing at hand, or a
placement file written by ``Placement.save`` (``.json``). The grouping methods also decide which rank each
request runs on; that applies to ``--trace`` replays, where requests exist, and is ignored (with a note) for
the random layer and the model, whose ranks hold fixed tokens.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

PLACEMENT_METHODS = ("contiguous", "round_robin", "eplb", "locality", "grouping", "grouping+locality")
GROUPINGS = ("round_robin", "random", "domain", "signature")
GROUPING_METHODS = ("grouping", "grouping+locality")  # they choose the requests' ranks themselves


def placement_arg(text: str) -> str:
    """argparse type of ``--placement``: a method name or a .json file that exists."""
    if text in PLACEMENT_METHODS or (text.endswith(".json") and os.path.isfile(text)):
        return text
    if text.endswith(".json"):
        raise argparse.ArgumentTypeError(f"no such placement file: {text!r}")
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(PLACEMENT_METHODS)} or a placement .json file "
                                     f"(Placement.save), got {text!r}")


def default_gpus_per_node(world: int) -> int:
    """Two nodes for an even number of ranks >= 4, else one rank per node (see the module docstring)."""
    return world // 2 if world >= 4 and world % 2 == 0 else 1


def topology(gpus_per_node: int | None, world: int):
    """The ``Topology`` of the run; raises ValueError when ``gpus_per_node`` does not divide the ranks."""
    from minimoe.placement import Topology

    per_node = gpus_per_node or default_gpus_per_node(world)
    if world % per_node:
        raise ValueError(f"--gpus-per-node {per_node} does not divide the {world} ranks")
    return Topology(num_nodes=world // per_node, gpus_per_node=per_node)


def nodes_line(gpus_per_node: int | None, world: int) -> str:
    shape = topology(gpus_per_node, world)
    why = "" if gpus_per_node or world == 1 else \
        " (the default, so that traffic between nodes shows; --gpus-per-node sets it)"
    return f"{shape.num_nodes} node(s) of {shape.gpus_per_node} rank(s){why}"


def saved_deployment(path: str):
    """The ``minimoe report`` deployment file at ``path`` (its placement, per-request sources and held-out split),
    or None when ``path`` is a method name or a plain placement file."""
    from minimoe.placement import Deployment
    from minimoe.placement.deployment import FORMAT

    if not path.endswith(".json"):
        return None
    try:
        with open(path) as file:
            is_deployment = json.load(file).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return None  # fit_placement reports what is wrong with the file
    return Deployment.load(path) if is_deployment else None


def check_replicas(replicas: int | None, num_experts: int, num_gpus: int) -> None:
    """--replicas (physical slots per layer): from num_experts to num_experts x max(ranks, ``MAX_SLOTS_PER_EXPERT``),
    a multiple of the ranks; ValueError naming the flag otherwise (None: the default, always fine)."""
    from minimoe.placement.methods import MAX_SLOTS_PER_EXPERT

    if replicas is None:
        return
    most = num_experts * max(num_gpus, MAX_SLOTS_PER_EXPERT)
    if not num_experts <= replicas <= most:
        raise ValueError(f"--replicas {replicas}: expected physical slots per layer from the {num_experts} experts "
                         f"to {most} (every rank holding each expert, or {MAX_SLOTS_PER_EXPERT} copies of each)")
    if replicas % num_gpus:
        raise ValueError(f"--replicas {replicas}: expected a multiple of the {num_gpus} ranks (every rank holds as "
                         "many slots)")


def fit_placement(method: str, trace, shape, replicas: int | None, seed: int = 0, fit_tokens=None, sources=None,
                  grouping_given: bool = False):
    """(placement, sources or None, note) for ``--placement``: a method fitted on ``trace`` (rows ``fit_tokens``),
    or a saved file checked against the trace and the ranks. ``sources`` (per-request ranks) are kept for the
    placement-only methods and chosen by the grouping methods. Raises ValueError with the flag's name."""
    from minimoe.placement import Placement, place
    from minimoe.placement.experiments import fit

    if method.endswith(".json"):
        placement = Placement.load(method)
        if (placement.num_gpus, placement.num_experts) != (shape.num_gpus, trace.num_experts) or \
                placement.num_layers != trace.num_layers:
            raise ValueError(f"--placement {method}: it places {placement.num_layers} layer(s) x "
                             f"{placement.num_experts} experts on {placement.num_gpus} GPUs; this run needs "
                             f"{trace.num_layers} x {trace.num_experts} on {shape.num_gpus}")
        if placement.gpus_per_node != shape.gpus_per_node:
            raise ValueError(f"--placement {method} has {placement.gpus_per_node} GPUs per node but the run "
                             f"{shape.gpus_per_node} (set --gpus-per-node {placement.gpus_per_node})")
        return placement, sources, f"placement from {method}"
    check_replicas(replicas, trace.num_experts, shape.num_gpus)
    slots = replicas or -(-trace.num_experts // shape.num_gpus) * shape.num_gpus
    mask = np.ones(trace.num_tokens, dtype=bool) if fit_tokens is None else fit_tokens
    if method in GROUPING_METHODS:
        if grouping_given:
            raise ValueError(f"--placement {method} chooses the grouping itself: leave --grouping unset")
        placement, chosen = fit(trace, shape, method, mask, slots, seed=seed)
        return placement, chosen, f"{method} (placement and grouping fitted together)"
    extra = {"sources": sources} if method == "locality" and sources is not None else {}
    return place(trace, shape, method, num_replicas=slots, tokens=mask, **extra), sources, method
