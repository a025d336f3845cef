"""``minimoe report`` on a load-only trace (``minimoe.traces.loads``): what expert counts can and cannot decide.

Counts per (step, layer, expert) support:

    imbalance      per MoE layer, max/mean tokens per expert, Gini and normalised entropy of the totals
                   (``minimoe.traces.analysis``); with steps in time order, the first half next to the second
    placement      contiguous, round-robin and EPLB from the loads (the rules of ``minimoe.placement.methods``);
                   with co-activation counts, the locality placement on the graph of expert pairs
                   (co-activated pairs kept on one node: the pairwise relaxation of the hypergraph objective of
                   ``minimoe.placement.hypergraph``, weighted by how many tokens chose both)
    measured by    load per GPU ((token, expert) pairs, the counts engines dump), max / mean, with each expert's
                   load split evenly over its copies (vLLM's
                   ``position % copies`` rule), averaged over layers; and, with co-activation, the fraction of
                   co-activated pairs some node holds both experts of ("pairs on one node")
    fitted on      the first half of the steps and measured on the second when the steps are in time order
                   (the placement never saw the traffic it is judged on); else fitted and measured on the totals,
                   and the report says the numbers are in-sample

They cannot support all-to-all bytes, grouping or prefill -> decode prediction (those need which token chose which
experts); the report says so in one line. The decision rule is ``minimoe.placement.decision``'s with load in
place of bytes: the lowest load, or with co-activation the most pairs on one node among placements within
``LOAD_TOLERANCE`` of EPLB's load.
"""

from __future__ import annotations

import numpy as np

from minimoe.placement.decision import DEFINITIONS, LOAD_TOLERANCE, saved_lines
from minimoe.placement.eplb import eplb_numpy
from minimoe.placement.hypergraph import Hypergraph
from minimoe.placement.locality import node_partition, slot_need
from minimoe.placement.locality_slots import fill_spares, pack_gpus
from minimoe.placement.methods import _static_layout
from minimoe.placement.phy2log import Placement
from minimoe.placement.topology import Topology
from minimoe.traces.analysis import gini, max_over_mean, normalized_entropy
from minimoe.traces.inputs import plural

LOAD_METHODS = ("contiguous", "round_robin", "eplb", "locality")
NOT_MEASURED = ("all-to-all bytes, request grouping and prefill -> decode prediction: not measured (counts only; "
                "they need per-token routing, e.g. vLLM/SGLang routed-experts captures or a JSONL routing log)")


def _pair_layer(coactivation: np.ndarray, topology: Topology, num_slots: int, epsilon: float = 0.1,
                seed: int = 0) -> np.ndarray:
    """phy2log (R,) of one layer from its co-activation (E, E): a node partition of the pair graph, then copies
    and GPUs as ``minimoe.placement.locality`` places them (sources unknown)."""
    num_experts = coactivation.shape[0]
    first, second = np.triu_indices(num_experts, 1)
    weight = coactivation[first, second] + coactivation[second, first]  # tokens choosing both, counted once
    keep = weight > 0
    graph = Hypergraph(np.stack([first[keep], second[keep]], axis=1), num_experts, topology.num_nodes,
                       weight=weight[keep])
    cap = (1 + epsilon) * graph.load.sum() / topology.num_nodes
    gpu_cap = (1 + epsilon) * graph.load.sum() / topology.num_gpus
    graph.slot_need = slot_need(graph.load, num_slots, gpu_cap)
    home = node_partition(graph.merged(), num_slots // topology.num_nodes, cap, "fm", 50, seed)
    copies, served = fill_spares(graph, home, num_slots // topology.num_nodes, cap, np.arange(len(graph.weight)),
                                 (topology.gpus_per_node, num_slots // topology.num_gpus), gpu_cap, False)
    return pack_gpus(copies, served, topology, num_slots // topology.num_gpus, None, gpu_cap)


def place_loads(loads: np.ndarray, topology: Topology, method: str, num_slots: int, coactivation=None,
                seed: int = 0) -> Placement:
    """A placement from loads (L, E) (and co-activation (L, E, E) for "locality"), as ``place`` would fit it."""
    num_layers, num_experts = loads.shape
    num_slots = topology.num_slots(num_slots, num_experts)
    grid = (topology.num_nodes, topology.gpus_per_node)
    if method in ("contiguous", "round_robin"):
        phy2log = _static_layout(num_layers, num_experts, topology, num_slots, loads, method)
    elif method == "eplb":  # place(method="eplb")'s default: hierarchical only when 1 group divides the nodes
        phy2log, _, _ = eplb_numpy(loads, num_slots, 1, topology.num_nodes, topology.num_gpus)
    elif method == "locality":
        if coactivation is None:
            raise ValueError("the locality placement of a load trace needs co-activation counts")
        phy2log = np.stack([_pair_layer(coactivation[layer], topology, num_slots, seed=seed)
                            for layer in range(num_layers)])
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {LOAD_METHODS}")
    return Placement(phy2log, num_experts, *grid, method=method)


def gpu_load(placement: Placement, loads: np.ndarray) -> float:
    """Mean over layers of max/mean load per GPU ((token, expert) pairs), each expert's load split evenly over its
    copies."""
    copies = placement.replica_counts()  # (L, E)
    per_slot = np.take_along_axis(loads / copies, placement.phy2log, axis=1)  # (L, R)
    per_gpu = per_slot.reshape(placement.num_layers, placement.num_gpus, -1).sum(axis=2)  # (L, G)
    return float(np.mean(per_gpu.max(axis=1) / per_gpu.mean(axis=1)))


def pair_locality(placement: Placement, coactivation: np.ndarray) -> float:
    """Fraction of co-activated pairs (tokens choosing both, over all layers) that some node holds both of."""
    hosts = placement.hosts("node").astype(np.int64)  # (L, E, N)
    together = np.einsum("len,lfn->lef", hosts, hosts) > 0  # (L, E, E)
    off = ~np.eye(placement.num_experts, dtype=bool)[None]
    total = (coactivation * off).sum()
    return float((coactivation * off * together).sum() / total) if total else float("nan")


def _imbalance(lt, steps=None) -> dict:
    totals = lt.loads(steps)
    return dict(max_over_mean=max_over_mean(totals).tolist(), gini=gini(totals).tolist(),
                entropy=normalized_entropy(totals).tolist(), hottest_expert=totals.argmax(axis=1).tolist())


def run_load_report(lt, topologies: list[Topology], seed: int = 0, progress=None) -> dict:
    """Everything the report shows for a LoadTrace ``lt``, as a JSON-ready dict."""
    from minimoe.placement.report import slot_budgets

    say = progress or (lambda message: None)
    half = lt.ordered and lt.num_steps >= 2
    fit_steps = np.arange(lt.num_steps) < lt.num_steps // 2 if half else np.ones(lt.num_steps, bool)
    eval_steps = ~fit_steps if half else fit_steps
    result = dict(kind="loads", trace=dict(source=lt.source, model=lt.model, steps=lt.num_steps,
                                           layers=lt.layer_ids.tolist(), experts=lt.num_experts, top_k=lt.top_k,
                                           pairs=int(lt.counts.sum()), coactivation=lt.coactivation is not None,
                                           notes=lt.notes),
                  imbalance=_imbalance(lt), not_measured=NOT_MEASURED,
                  fit=("the first half of the steps, measured on the second" if half else
                       "all steps, measured on the same totals (in-sample: the steps are not in time order)"
                       if not lt.ordered else "the single step, measured on the same counts (in-sample)"))
    if half:
        result["imbalance_halves"] = [_imbalance(lt, fit_steps)["max_over_mean"],
                                      _imbalance(lt, eval_steps)["max_over_mean"]]
    fit_loads, eval_loads = lt.loads(fit_steps), lt.loads(eval_steps)
    methods = LOAD_METHODS if lt.coactivation is not None else LOAD_METHODS[:3]
    rows = []
    for topology in topologies:
        for num_slots in slot_budgets(lt.num_experts, topology):
            say(f"placement from loads: {topology} ({topology.num_gpus} GPUs), {num_slots} slots per layer")
            for method in methods:
                placement = place_loads(fit_loads, topology, method, num_slots, lt.coactivation, seed)
                row = dict(topology=str(topology), num_replicas=num_slots, method=method,
                           load_max_over_mean=gpu_load(placement, eval_loads))
                if lt.coactivation is not None:
                    row["pairs_on_one_node"] = pair_locality(placement, lt.coactivation)
                rows.append(row)
    result["rows"] = rows
    result["decision"] = decide_loads(rows, topologies)
    return result


def decide_loads(rows: list[dict], topologies: list[Topology]) -> list[dict]:
    decisions = []
    for topology in topologies:
        picked = [r for r in rows if r["topology"] == str(topology)]
        eplb = {r["num_replicas"]: r["load_max_over_mean"] for r in picked if r["method"] == "eplb"}
        if "pairs_on_one_node" in picked[0]:
            eligible = [r for r in picked if r["load_max_over_mean"] <= LOAD_TOLERANCE * eplb[r["num_replicas"]]]
            best = min(eligible or picked, key=lambda r: (-r["pairs_on_one_node"], r["load_max_over_mean"],
                                                          r["num_replicas"]))
        else:
            best = min(picked, key=lambda r: (r["load_max_over_mean"], r["num_replicas"],
                                              LOAD_METHODS.index(r["method"])))
        pairs = (f"; {best['pairs_on_one_node']:.1%} of co-activated pairs on one node" if "pairs_on_one_node" in best
                 else "")
        decisions.append(dict(topology=str(topology), recommended=best, headline=(
            f"{topology}: deploy {best['method']} with {best['num_replicas']} slots per layer "
            f"({best['num_replicas'] // topology.num_gpus} per GPU): (token, expert) pairs per GPU "
            f"max/mean {best['load_max_over_mean']:.2f}{pairs}")))
    return decisions


def save_load_decision(lt, result: dict, topologies: list[Topology], folder, seed: int = 0) -> list[str]:
    """Write each topology's recommended placement (a ``minimoe.deployment/1`` file without sources)."""
    from pathlib import Path

    from minimoe.placement.deployment import Deployment

    by_name = {str(t): t for t in topologies}
    half = lt.ordered and lt.num_steps >= 2
    fit_steps = np.arange(lt.num_steps) < lt.num_steps // 2 if half else np.ones(lt.num_steps, bool)
    names = []
    for d in result["decision"]:
        row = d["recommended"]
        placement = place_loads(lt.loads(fit_steps), by_name[d["topology"]], row["method"], row["num_replicas"],
                                lt.coactivation, seed).with_layer_ids(lt.layer_ids)  # None unless all are known
        name = f"placement-{d['topology']}.json"
        Deployment(placement=placement, method=row["method"], split={"kind": "steps" if half else "totals"},
                   seed=seed, measured={k: v for k, v in row.items() if k not in ("topology", "method")},
                   trace=dict(source=lt.source, steps=lt.num_steps, layers=lt.num_layers,
                              num_experts=lt.num_experts)).save(Path(folder) / name)
        d["files"], d["layer_ids"] = [name], placement.layer_ids
        names.append(name)
    return names


def format_load_report(result: dict, folder: str | None = None) -> str:
    """The load report as plain text."""
    info, imb = result["trace"], result["imbalance"]
    lines = [f"load counts from {info['source'] or 'a load trace'} (model {info['model'] or '(unnamed)'}): "
             f"{plural(info['steps'], 'step')}, {plural(len(info['layers']), 'MoE layer')}, "
             f"{plural(info['experts'], 'expert')}, "
             f"{info['pairs']:,} (token, expert) pairs" + (f", top-{info['top_k']}" if info["top_k"] else ""), ""]
    lines += [f"note: {k}: {v}" for k, v in info["notes"].items()]
    lines += ["", "Load imbalance per MoE layer (totals; max/mean tokens per expert, 1 = balanced):"]
    for index, layer in enumerate(info["layers"]):
        label = f"layer {layer}" if layer >= 0 else f"MoE layer {index}"
        lines.append(f"  {label:12s} max/mean {imb['max_over_mean'][index]:6.3f}  Gini {imb['gini'][index]:.3f}  "
                     f"entropy/log E {imb['entropy'][index]:.3f}  hottest expert {imb['hottest_expert'][index]}")
    if "imbalance_halves" in result:
        first, second = result["imbalance_halves"]
        lines.append("  max/mean, first half of the steps -> second half: "
                     + ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in zip(first, second)))
    pairs_legend = "; pairs = co-activated expert pairs some node holds both of" if info["coactivation"] else ""
    lines += ["", f"Placement from loads, fitted on {result['fit']}; load = (token, expert) pairs per GPU, max / "
                  f"mean (each expert's load split evenly over its copies){pairs_legend}:"]
    for r in result["rows"]:
        pairs = f"  pairs {r['pairs_on_one_node']:.1%}" if "pairs_on_one_node" in r else ""
        lines.append(f"  {r['topology']:8s} {r['num_replicas']:5d} slots  {r['method']:12s} load "
                     f"{r['load_max_over_mean']:.3f}{pairs}")
    lines += ["Methods:"] + [f"  {m:12s} {DEFINITIONS[m]}" for m in dict.fromkeys(r["method"] for r in result["rows"])]
    if info["coactivation"]:
        lines.append("  (locality here partitions the graph of co-activated pairs: the counts hold pairs, not "
                     "whole tokens)")
    lines += ["", result["not_measured"], "", "Decision (the lowest load" + (
        f", or with co-activation the most pairs on one node within {LOAD_TOLERANCE:.2f}x EPLB's load" if
        info["coactivation"] else "") + "):"]
    lines += ["  " + d["headline"] for d in result["decision"]]
    lines += saved_lines(result["decision"], folder, "To deploy one:")
    return "\n".join(lines)
