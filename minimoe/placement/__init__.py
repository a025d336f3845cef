"""Placement and grouping: where each expert lives, where each request runs, and what that costs.

``topology`` describes nodes x GPUs; ``eplb`` is DeepSeek's load balancer; ``phy2log`` is the ``Placement``
(which GPU slot holds which expert, which replica serves a token), and ``methods`` fits one (contiguous,
round-robin, EPLB, locality); ``hypergraph``, ``refinement``, ``locality`` and ``locality_slots`` are the
co-activation partitioner (its hypergraph, our FM refinement or Mt-KaHyPar, and the slot filling);
``grouping`` assigns requests to GPUs (by the balanced assignment of ``balanced``); ``traffic`` counts the
all-to-all bytes and load of a placement; ``experiments`` fits on prefill and evaluates on held-out decode,
``splits`` says what to fit and measure on when a trace has no phases; ``fitdata``, ``evaluate``, ``streaming``
and ``engine`` run those experiments on traces of any size in two passes (in this process or on Dask workers);
``report`` is the main job (``minimoe report``) and ``report_text`` prints it, ``decision`` its recommendation,
``deployment`` the placement file it saves, ``load_report`` what it does with load counts only, and ``export``
writes a placement in SGLang's, TensorRT-LLM's, vLLM's or EPLB's file (the ``minimoe export`` command:
``export_command``). Chapters 6 and 7 teach this part.
"""

from minimoe.placement.deployment import Deployment
from minimoe.placement.eplb import eplb
from minimoe.placement.grouping import group, group_and_place
from minimoe.placement.methods import place, trace_loads
from minimoe.placement.phy2log import Placement
from minimoe.placement.topology import Topology
from minimoe.placement.traffic import TrafficReport, measure, request_sources, uniform_nodes_per_token

__all__ = ["Deployment", "Placement", "Topology", "TrafficReport", "eplb", "group", "group_and_place", "measure",
           "place", "request_sources", "trace_loads", "uniform_nodes_per_token"]
