"""The report page: ``report.html``, one offline file (plotly.js embedded once) that explains its own terms.

Each figure comes with the definition of what it plots, written where the reader meets it; every method
keeps one colour in every figure; the page reflows to the window's width.
"""

from __future__ import annotations

import html
from pathlib import Path

from minimoe.placement.experiments import FIT_MODES, METHODS
from minimoe.placement.splits import LABELS

METHOD_COLORS = {"contiguous": "#7f7f7f", "round_robin": "#bcbd22", "eplb": "#1f77b4", "locality": "#2ca02c",
                 "grouping": "#ff7f0e", "grouping+locality": "#d62728"}

TERMS = {
    "saved": "How much less a method moves across node boundaries than <b>contiguous</b> placement (experts "
             "0..E/G-1 on GPU 0, and so on): 1 &minus; bytes<sub>method</sub> / bytes<sub>contiguous</sub>. "
             "Negative means it moves more. With one node nothing crosses a node boundary and the saving is "
             "undefined (shown as n/a).",
    "de-duplicated bytes": "A token is sent to a remote node once, however many of its top-k experts live there, "
                           "as hierarchical all-to-all kernels (DeepEP's normal mode) send it. This is the headline "
                           "unit.",
    "per-pair bytes": "One copy per (token, expert) pair whose expert lives on another node, as flat "
                      "all-to-all dispatch sends it.",
    "slots": "Physical expert slots per layer across all GPUs. Slots = experts means no replicas; one spare "
             "slot per GPU lets a method replicate hot or widely shared experts.",
    "fitted on": "What a method saw when it chose the layout: <b>prefill</b> = the prompts' routing (known "
                 "before decoding starts); <b>online</b> = the first decode tokens of every request; "
                 "<b>oracle</b> = the evaluated decode tokens themselves (an upper bound for a static layout). "
                 "Every method is measured on the same held-out decode tokens. On a trace without phases the split "
                 "says what stands in for each (e.g. each request's <b>first half</b> for prefill).",
    "load max/mean": "(token, expert) pairs each GPU computes, busiest GPU over the average. 1 is perfectly "
                     "balanced; the busiest GPU sets the step time.",
}


def _figures(result: dict) -> list:
    import plotly.graph_objects as go

    rows, figures = result["rows"], []
    labels = LABELS[(result.get("split") or {}).get("kind", "phase")]  # the fit modes' names under this split
    for mode in [m for m in FIT_MODES if any(r["fit"] == m for r in rows)]:
        fig = go.Figure()
        for method in METHODS[1:]:
            picked = [r for r in rows if r["method"] == method and r["fit"] == mode
                      and r["cut_vs_contiguous"] is not None]
            fig.add_bar(name=method, marker_color=METHOD_COLORS[method],
                        x=[f"{r['topology']} / {r['num_replicas']}" for r in picked],
                        y=[100 * r["cut_vs_contiguous"] for r in picked])
        fig.update_layout(title=f"Inter-node bytes saved vs contiguous (%), fit: {labels[mode]}",
                          xaxis_title="topology (nodes x GPUs) / slots per layer", yaxis_title="% saved",
                          barmode="group", height=420, autosize=True, margin=dict(l=60, r=20, t=60, b=60))
        figures.append(fig)
    load = go.Figure()
    for method in METHODS:
        picked = [r for r in rows if r["method"] == method and r["fit"] == "prefill"]
        load.add_scatter(name=method, mode="markers", marker=dict(color=METHOD_COLORS[method], size=10),
                         x=[f"{r['topology']} / {r['num_replicas']}" for r in picked],
                         y=[r["load_max_over_mean"] for r in picked])
    load.update_layout(title=f"(token, expert) pairs per GPU, max / mean (fit: {labels['prefill']})",
                       yaxis_title="max / mean",
                       xaxis_title="topology (nodes x GPUs) / slots per layer", height=380, autosize=True,
                       margin=dict(l=60, r=20, t=60, b=60))
    figures.append(load)
    return figures


def write_html(path: Path, result: dict, text: str) -> None:
    """Write the report page for ``result`` (``minimoe.placement.report.run_report``) and its plain ``text``."""
    info = result["trace"]
    phases = (f"{info['prefill_tokens']:,} prefill, {info['decode_tokens']:,} decode"
              if info["prefill_tokens"] + info["decode_tokens"] else "phases unknown")
    summary = (f"{html.escape(str(info['model']))}: {info['requests']:,} requests, {info['tokens']:,} tokens "
               f"({phases}), {info['layers']} MoE "
               f"layers, {info['experts']} experts, top-{info['top_k']}")
    body = text.split("\n\n", 1)[-1]  # the text opens with the trace summary, shown above already
    terms = "".join(f"<dt>{name}</dt><dd>{text}</dd>" for name, text in TERMS.items())
    decision = "".join(f"<li>{html.escape(d['headline'])}</li>" for d in result.get("decision") or [])
    decision = f"<h2>Decision</h2><ul>{decision}</ul><p>The rule, the methods and the files: see the end of the " \
               "text below.</p>" if decision else ""
    split = (result.get("split") or {}).get("description")
    split = f"<p>Split: {html.escape(split)}.</p>" if split else ""
    parts = []
    if result["rows"]:
        figures = _figures(result)
        parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"responsive": True})
                 for i, fig in enumerate(figures)]
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>minimoe report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:1em;line-height:1.45}}
pre{{overflow-x:auto;font-size:12px;background:#f6f6f6;padding:0.8em}} dt{{font-weight:bold;margin-top:0.5em}}
.plotly-graph-div{{width:100%!important}}</style></head><body>
<h1>minimoe report</h1><p>Trace: {summary}.</p>{split}{decision}
<h2>Terms</h2><dl>{terms}</dl>
<h2>Placement and grouping</h2>{''.join(parts) or '<p>Not measured (see the text below).</p>'}
<h2>Full text</h2><pre>{html.escape(body)}</pre>
</body></html>
"""
    Path(path).write_text(page)


def write_text_html(path: Path, title: str, text: str) -> None:
    """A report page that is only its text (the load-only report: no per-token figures to draw)."""
    Path(path).write_text(f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:1em}}
pre{{overflow-x:auto;font-size:12px;background:#f6f6f6;padding:0.8em}}</style></head><body>
<h1>{html.escape(title)}</h1><pre>{html.escape(text)}</pre>
</body></html>
""")
