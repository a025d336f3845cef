"""The end of ``minimoe report``: which placement (and grouping) to deploy on each topology, and why.

Rule (per topology; every candidate fitted on what stands in for prefill, measured on held-out tokens):

    eligible     the busiest GPU carries at most ``LOAD_TOLERANCE`` = 1.10 x the tokens it carries under
                 EPLB with the same slots (EPLB balances load; the busiest GPU sets the step time)
    recommended  among the eligible (method, slots) pairs, the fewest de-duplicated inter-node bytes; ties
                 (one node: no inter-node bytes at all) go to the lower load, then to fewer slots
    placement    the same rule over the methods that need nothing from the serving system but the file
      only       (contiguous, round-robin, EPLB, locality): what to deploy when requests cannot be steered

Grouping methods move requests, not only experts: the saving needs the serving system to run each request's
decode on the GPU its prompt's expert signature picks (disaggregated prefill and decode with a
signature-aware decode scheduler, as ELDR [choi2026eldr] does; key of book/references.bib). The report says so
next to every grouping recommendation.
"""

from __future__ import annotations

import shlex

from minimoe.placement.experiments import METHODS, fit
from minimoe.placement.topology import Topology
from minimoe.traces.layers import layer_list

LOAD_TOLERANCE = 1.10
GROUPING = ("grouping", "grouping+locality")
DEFINITIONS = {
    "contiguous": "expert e on GPU floor(e·G/E), the engines' default; spare slots copy the experts with the most "
                  "tokens per copy",
    "round_robin": "expert e on GPU e mod G; spare slots as for contiguous",
    "eplb": "DeepSeek's EPLB: copies the busiest experts and packs GPUs to equal load; blind to which experts "
            "fire together",
    "locality": "minimoe's co-activation placement: experts that the same tokens use kept on one node (a "
                "hypergraph partition of the fitted tokens, node load <= 1.1 x mean), copies where they save most",
    "grouping": "requests moved to the GPU whose node holds most of their prompt's experts, under the contiguous "
                "placement (grouping alone)",
    "grouping+locality": "grouping and locality placement fitted together, alternating (both changes at once)",
}
STEERING = ("the serving system must run each request on the GPU its prompt's expert signature picks "
            "(minimoe.placement.group(..., placement=) on the request's prefill routing), e.g. a decode scheduler "
            "in disaggregated prefill/decode serving; engines do not do this by themselves")


def _key(row: dict):
    return (row["inter_node_bytes"], row["load_max_over_mean"], row["num_replicas"], METHODS.index(row["method"]))


def recommend(rows: list[dict], topology: str) -> dict | None:
    """{"recommended": row, "placement_only": row} for one topology from ``experiments.compare`` rows (fit mode
    "prefill"), or None when the topology has no rows."""
    picked = [r for r in rows if r["topology"] == topology and r["fit"] == "prefill"]
    if not picked:
        return None
    eplb_load = {r["num_replicas"]: r["load_max_over_mean"] for r in picked if r["method"] == "eplb"}
    eligible = [r for r in picked if r["load_max_over_mean"] <= LOAD_TOLERANCE * eplb_load.get(r["num_replicas"],
                                                                                                float("inf")) + 1e-9]
    eligible = eligible or picked
    best = min(eligible, key=_key)
    alone = [r for r in eligible if r["method"] not in GROUPING]
    return {"recommended": best, "placement_only": min(alone, key=_key) if alone else None}


def _saving(row: dict) -> str:
    if row.get("cut_vs_contiguous") is None:
        return "no inter-node traffic (one node)"
    fewer = lambda v: "n/a" if v is None else f"{abs(v):.1%} {'fewer' if v >= 0 else 'more'}"  # noqa: E731
    return (f"{fewer(row['cut_vs_contiguous'])} inter-node bytes than contiguous, {fewer(row.get('cut_vs_eplb'))} "
            "than EPLB")


def headline(choice: dict, gpus: int) -> str:
    """One line: what to deploy on this topology, its measured saving and its load."""
    row = choice["recommended"]
    text = (f"{row['topology']}: deploy {row['method']} with {row['num_replicas']} slots per layer "
            f"({row['num_replicas'] // gpus} per GPU): {_saving(row)}; (token, expert) pairs per GPU "
            f"max/mean {row['load_max_over_mean']:.2f}")
    if row["method"] in GROUPING:
        text += " (needs request steering, below)"
    return text


def format_methods(methods) -> str:
    """The definition of each method in ``methods``, one per line (printed under the table that uses them)."""
    lines = [f"  {name:18s} {DEFINITIONS[name]}" for name in methods]
    return "\n".join(["Methods:", *lines, "  (the methods without grouping are measured with the requests spread over "
                       "the GPUs at random, balanced, as a data-parallel scheduler spreads them)"])


FEW_TOKENS = 1000  # fewer held-out tokens than this: the decision is said to be indicative only


def format_decision(decisions: list[dict], folder: str | None = None, eval_tokens: int | None = None) -> str:
    """The report's last section: a headline per topology, the alternatives, the steering, the export line."""
    measured = "held-out tokens" if eval_tokens is None else \
        f"{eval_tokens:,} held-out token{'' if eval_tokens == 1 else 's'}"
    if eval_tokens is not None and eval_tokens < FEW_TOKENS:
        measured += f" (fewer than {FEW_TOKENS:,}: indicative only; a longer log decides)"
    lines = [f"Decision (fitted on what stands in for prefill, measured on {measured}; the rule: the fewest "
             f"inter-node bytes among placements whose busiest GPU carries at most {LOAD_TOLERANCE:.2f}x its load "
             "under EPLB with the same slots):"]
    for d in decisions:
        lines.append("  " + d["headline"])
        alone = d.get("placement_only")
        if d["recommended"]["method"] in GROUPING and alone:
            lines.append(f"      without request steering: {alone['method']} with {alone['num_replicas']} slots: "
                         f"{_saving(alone)}; (token, expert) pairs per GPU max/mean "
                         f"{alone['load_max_over_mean']:.2f}")
    used = dict.fromkeys(m for d in decisions for m in (d["recommended"]["method"],
                                                         (d.get("placement_only") or {}).get("method")) if m)
    if any(m in GROUPING for m in used):
        lines.append(f"Request steering (grouping methods): {STEERING}.")
    lines += saved_lines(decisions, folder, "To deploy one, write it in your engine's file:")
    return "\n".join(lines)


def saved_lines(decisions: list[dict], folder: str | None, lead: str) -> list[str]:
    """The files the decisions saved and the ``minimoe export`` line that turns one into an engine's file."""
    files = [f for d in decisions for f in d.get("files", [])]
    if not files:
        return []
    where = f"{folder}/" if folder else ""
    command = f"  minimoe export {shlex.quote(where + files[0])} --format sglang|trtllm|vllm|eplb --out FILE"
    layers = decisions[0].get("layer_ids")  # the model layers of the placements' rows, when the trace said
    if layers is None:
        return [f"Saved: {', '.join(where + f for f in files)}. {lead}",
                f"{command} --config MODEL/config.json   (or, for sglang and trtllm, --moe-layers with the model's MoE "
                "layer indices)"]
    return [f"Saved: {', '.join(where + f for f in files)}. {lead}",
            f"{command} --config MODEL/config.json   (the files record their rows' model layers, "
            f"{layer_list(layers)}; sglang can do without --config, given --num-layers N)"]


def decide(rows: list[dict], topologies: list[Topology]) -> list[dict]:
    """The recommendation of every topology that has rows (JSON-ready)."""
    decisions = []
    for topology in topologies:
        choice = recommend(rows, str(topology))
        if choice is not None:
            decisions.append({**choice, "topology": str(topology), "headline": headline(choice, topology.num_gpus)})
    return decisions


def deployments(trace, decisions: list[dict], topologies: list[Topology], token_sets: dict, split_info: dict,
                seed: int = 0, fitted: dict | None = None):
    """[(file name, Deployment)] for each decision: the recommended placement as the report fitted it (taken from
    ``fitted``, ``experiments.compare``'s record, else refitted with the same method, slots, fitting tokens and
    seed), and the placement-only alternative when it differs."""
    from minimoe.placement.deployment import Deployment, trace_fingerprint

    by_name = {str(t): t for t in topologies}
    files = []
    for d in decisions:
        topology = by_name[d["topology"]]
        choices = [("", d["recommended"])]
        if d["recommended"]["method"] in GROUPING and d.get("placement_only"):
            choices.append(("-placement-only", d["placement_only"]))
        d["files"] = []
        for suffix, row in choices:
            key = (d["topology"], row["num_replicas"], row["method"])
            placement, sources = (fitted or {}).get(key) or fit(trace, topology, row["method"], token_sets["prefill"],
                                                                 row["num_replicas"], seed)
            placement = placement.with_layer_ids(getattr(trace, "layer_ids", None))  # the model layers, when known
            name = f"placement-{d['topology']}{suffix}.json"
            measured = {k: row.get(k) for k in ("inter_node_bytes", "cut_vs_contiguous", "cut_vs_eplb",
                                                "load_max_over_mean", "pair_node_local_fraction")}
            files.append((name, Deployment(placement=placement, method=row["method"], sources=sources,
                                           steering=STEERING if row["method"] in GROUPING else None,
                                           split=dict(split_info), seed=seed, measured=measured,
                                           trace=trace_fingerprint(trace))))
            d["files"].append(name)
        d["layer_ids"] = placement.layer_ids
    return files
