"""Expert parallelism over torch.distributed: the experts of a MoE layer spread over ranks, tokens moved by
all-to-all or by all-gather and reduce-scatter. Chapter 5 teaches this part.

Read in this order: ``comm`` (the process group, the collectives and their gradients, the one host sync of a
leg), ``routing`` (which replica serves a pair, capacity across ranks), ``sendplan`` (who sends what where,
built on the device), ``legs`` (one all-to-all leg and its way back), ``dispatch`` (dispatch and combine in four
wire formats), ``replicate`` (the
all-gather / reduce-scatter format), ``counters`` (bytes per link class), ``formats`` (which format to use),
``experts`` (a rank's experts on the rows it received), ``checks`` (ranks agree before any exchange), ``layer``
(the expert-parallel MoE layer and ``expert_parallel(model, placement)``), ``replay`` (a recorded trace through
the real exchange) and ``demo`` (the ``minimoe ep-demo`` command).
"""

from minimoe.parallel.checks import check_fingerprint, fingerprint
from minimoe.parallel.comm import collectives_at_one_rank, destroy_process_group, init_process_group
from minimoe.parallel.counters import TrafficCounters
from minimoe.parallel.dispatch import WIRE_FORMATS, Dispatched, Handle, combine, dispatch
from minimoe.parallel.experts import local_experts
from minimoe.parallel.formats import FormatChoice, choose_wire_format, expected_ranks_per_token
from minimoe.parallel.layer import ExpertParallelMoE, expert_parallel
from minimoe.parallel.routing import RouteTable, capacity_kept

__all__ = ["Dispatched", "ExpertParallelMoE", "FormatChoice", "Handle", "RouteTable", "TrafficCounters",
           "WIRE_FORMATS", "capacity_kept", "check_fingerprint", "choose_wire_format", "collectives_at_one_rank",
           "combine", "destroy_process_group", "dispatch", "expected_ranks_per_token", "expert_parallel",
           "fingerprint", "init_process_group", "local_experts"]
