"""The findings of ``minimoe.traces.findings`` as the plain-text table ``minimoe findings`` and ``minimoe report``
print: (a) load imbalance per layer next to uniform routing, (b) the JS divergence between domains next to random
halves of one domain, (c) prefill-decode correlation next to shuffled pairs. A finding the trace cannot support
prints as "not measured: reason".
"""
from __future__ import annotations

from minimoe.traces.inputs import plural


def _versus_baseline(domain: dict) -> str:
    """The smallest between-domain JS next to the largest random-split JS, with their ratio when it has one."""
    between, baseline = domain["between_min"], domain["baseline_max"]
    if baseline > 0:
        return f"smallest between-domain JS {between:.4f} = {between / baseline:.1f}x the largest random-split JS " \
               f"{baseline:.4f}"
    why = "both are 0" if between == 0 else "the baseline is 0"
    return f"smallest between-domain JS {between:.4f}, largest random-split JS {baseline:.4f}: ratio not measured " \
           f"({why})"


def _row(label: str, values, fmt: str = "{:6.3f}", extra: str = "") -> str:
    return f"  {label:<26s}" + "".join(f"  {fmt.format(v):>13s}" for v in values) + (f"   {extra}" if extra else "")


def _requests(count: int) -> str:
    return f"{count:,} request" + ("" if count == 1 else "s")


def _label(domain: str) -> str:
    """A domain label as printed: an empty one is shown as such, not as blank space."""
    return domain or "(empty label)"


def format_findings(result: dict) -> str:
    """The findings as a plain-text table (what ``minimoe findings`` prints)."""
    info, imbalance, domain, paired = result["trace"], result["imbalance"], result["domain"], result["prefill_decode"]
    layers = info.get("layer_ids") or list(range(info["layers"]))  # the model's layer numbers, when known
    renumbered = layers != list(range(info["layers"]))
    domains = ", ".join(f"{_label(d)} {n}" for d, n in info["requests_per_domain"].items())
    phases = (f"{info['prefill_tokens']:,} prefill, {info['decode_tokens']:,} decode"
              if info["prefill_tokens"] + info["decode_tokens"] else "phases unknown")
    lines = [f"trace {info['model'] or '(unnamed)'}: {_requests(info['requests'])}" + (f" ({domains})" if domains
                                                                                          else "") + ", "
             f"{info['tokens']:,} tokens ({phases}), "
             f"{plural(info['layers'], 'MoE layer')}" + (" (numbered as in the model)" if renumbered else "")
             + f", {plural(info['experts'], 'expert')}, top-{info['top_k']}", ""]
    header = _row("", [f"layer {l}" for l in layers], "{}", "uniform routing, same tokens")
    groups = imbalance["groups"]
    lines += ["(a) Load imbalance per layer (max/mean load; 1 = balanced)", header]
    for name, group in groups.items():
        lines.append(_row(f"{_label(name)} ({group['tokens']:,} tok)", group["max_over_mean"], extra=
                          f"{group['uniform']['max_over_mean']:.3f} (p95 {group['uniform']['max_over_mean_p95']:.3f})"))
    low, high = groups["all"]["max_over_mean_ci"]
    if info["requests"] < 2:  # resampling one request gives it back every time: no interval
        lines.append(f"  {'all: bootstrap 2.5-97.5%':<26s}  not measured: one request")
    else:
        lines.append(_row("all: bootstrap 2.5-97.5%", [f"{a:.2f}-{b:.2f}" for a, b in zip(low, high)], "{}"))
    for stat, label in (("gini", "Gini"), ("entropy", "entropy / log E")):
        lines.append(_row(f"all: {label}", groups["all"][stat], extra=f"{groups['all']['uniform'][stat]:.3f}"))
    lines.append(_row("all: hottest expert", groups["all"]["hottest_expert"], "{}"))
    if imbalance["layers_differ"] is None:
        verdict = f"layers not compared ({imbalance['layers_differ_unavailable']})"
    else:
        verdict = (f"layer {layers[imbalance['most_imbalanced_layer']]} above layer "
                   f"{layers[imbalance['least_imbalanced_layer']]} "
                   f"in {imbalance['layers_differ_confidence']:.1%} of bootstrap resamples "
                   f"(differ: {imbalance['layers_differ']})")
    lines += [f"  -> every layer above uniform p95: {imbalance['above_uniform']}; {verdict}", ""]
    if "unavailable" in domain:
        lines += [f"(b) Domain specificity: not measured: {domain['unavailable']}", ""]
    else:
        lines += [f"(b) Domain specificity: JS divergence (bits) between domains' expert popularity",
                  _row("", [f"layer {l}" for l in layers], "{}", "mean over layers")]
        for name, pair in domain["pairs"].items():
            lines.append(_row(name, pair["per_layer"], extra=f"{pair['mean']:.4f}"))
        per_layer = domain["baseline_per_layer"]
        lines.append(_row(f"random halves: mean", per_layer["mean"], "{:6.4f}", f"{domain['baseline_mean']:.4f}"))
        lines.append(_row(f"random halves: max", per_layer["max"], "{:6.4f}",
                          f"{domain['baseline_max']:.4f}  ({domain['num_splits']} splits of "
                          + ", ".join(domain["baseline_domains"]) + ")"))
        lines += [f"  -> {_versus_baseline(domain)}; above the baseline in every layer: {domain['above_baseline']}",
                  ""]
    if "unavailable" in paired:
        lines.append(f"(c) Prefill predicts decode: not measured: {paired['unavailable']}")
        return "\n".join(lines)
    lines += [f"(c) Prefill predicts decode: Pearson r of each request's prefill and decode expert histograms "
              f"({_requests(paired['requests'])})",
              f"  {'':<26s}  {'mean':>8s}  {'median':>8s}  {'p95':>8s}  {'max mean':>8s}   requests above p95"]
    matched = paired["matched"]
    lines.append(f"  {'matched (own decode)':<26s}  {matched['mean']:8.3f}  {matched['median']:8.3f}")
    for key, label, frac in (("shuffled", "shuffled across requests", "fraction_above_shuffled_p95"),
                             ("within_domain", "shuffled within a domain", "fraction_above_within_domain_p95")):
        if key in paired:
            s = paired[key]
            lines.append(f"  {label:<26s}  {s['mean']:8.3f}  {s['median']:8.3f}  {s['p95']:8.3f}  "
                         f"{s['max_shuffle_mean']:8.3f}   {paired[frac]:.1%} of matched (5% by chance)")
    lines.append(f"  -> the matched mean beats the mean of each of {paired['num_shuffles']} shuffles "
                 f"(max mean column): {paired['above_baseline']}")
    return "\n".join(lines)

