"""Expert parallelism over torch.distributed: the experts of a MoE layer spread over ranks, tokens moved by
all-to-all. Chapter 5 teaches this part.

Read in this order: ``comm`` (the process group, the uneven all-to-all and its gradient), ``routing`` (which
replica serves a pair, capacity across ranks), ``dispatch`` (dispatch and combine in three wire formats, with
byte counters), ``experts`` (a rank's experts on the rows it received), ``checks`` (ranks agree before any
exchange), ``layer`` (the expert-parallel MoE layer and ``expert_parallel(model, placement)``), ``replay``
(a recorded trace through the real exchange) and ``demo`` (the ``minimoe ep-demo`` command).
"""

from minimoe.parallel.checks import check_fingerprint, fingerprint
from minimoe.parallel.comm import destroy_process_group, exchange, init_process_group
from minimoe.parallel.dispatch import WIRE_FORMATS, Dispatched, Handle, TrafficCounters, combine, dispatch
from minimoe.parallel.experts import local_experts
from minimoe.parallel.layer import ExpertParallelMoE, expert_parallel
from minimoe.parallel.routing import RouteTable, capacity_kept

__all__ = ["Dispatched", "ExpertParallelMoE", "Handle", "RouteTable", "TrafficCounters", "WIRE_FORMATS",
           "capacity_kept", "check_fingerprint", "combine", "destroy_process_group", "dispatch", "exchange",
           "expert_parallel", "fingerprint", "init_process_group", "local_experts"]
