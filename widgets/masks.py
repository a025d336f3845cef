"""The compression masks, drawn: who may read whom in one compressor pass (chapter 8).

A heatmap of query slots (rows) x key slots (columns): dark where the query may read the key. Slots are named
``t3`` (text token 3), ``m1`` (memory token 1) or ``a0`` (a token after a gist); the hover text gives each
slot's position id. Everything comes from ``minimoe.compress.masks``; nothing is re-implemented here.

- ``mask_heatmap(layout)``: one plotly figure of one ``Layout``;
- ``MaskWidget``: ipywidgets controls (context length, chunk size, ratio, variant, PIC's layout,
  memory-to-memory attention and position ids) that redraw the heatmap, for the live notebook;
- ``mask_figure(...)``: a plain plotly figure for the static book, with a dropdown over precomputed variants.
"""

from __future__ import annotations

import plotly.graph_objects as go

from minimoe.compress.masks import Layout, build_layout, causal_mask, gist_mask
from minimoe.widgets._panel import FigurePanel

VARIANT_NAMES = ("causal", "global", "pic", "gist")
READ_COLOR, BLOCKED_COLOR = "#1f5fa8", "#f2f2f2"


def layout_for(variant: str, num_text: int, ratio: int, chunk_size: int, layout: str = "append",
               mem_sees_prev_mem: bool = False, positions: str = "continue") -> Layout:
    """The ``Layout`` a widget setting describes (gist: k = n / ratio gist tokens and 4 tokens after them)."""
    if variant == "causal":
        return causal_mask(num_text)
    if variant == "gist":
        return gist_mask(num_text, build_layout("global", num_text, ratio).num_memory, 4)
    if variant == "pic":
        return build_layout("pic", num_text, ratio, chunk_size, layout=layout, mem_sees_prev_mem=mem_sees_prev_mem,
                            positions=positions)
    if variant == "global":
        return build_layout("global", num_text, ratio)
    raise ValueError(f"variant must be one of {VARIANT_NAMES}, got {variant!r}")


def slot_names(layout: Layout) -> list[str]:
    return [f"{'tma'[int(k)]}{int(i)}" for k, i in zip(layout.kind, layout.source)]


def _heatmap(layout: Layout, visible: bool = True) -> go.Heatmap:
    names, positions = slot_names(layout), layout.position_ids[0].tolist()
    allowed = layout.attention_mask[0, 0].int().tolist()
    hover = [[f"{names[q]} (pos {positions[q]}) {'reads' if allowed[q][k] else 'cannot read'} {names[k]} "
              f"(pos {positions[k]})" for k in range(len(names))] for q in range(len(names))]
    return go.Heatmap(z=allowed, x=names, y=names, text=hover, hoverinfo="text", showscale=False, visible=visible,
                      colorscale=[[0, BLOCKED_COLOR], [1, READ_COLOR]], zmin=0, zmax=1, xgap=1, ygap=1)


def _style(figure: go.Figure, title: str) -> go.Figure:
    figure.update_layout(title=title, height=560, width=620, margin=dict(l=60, r=20, t=60, b=60),
                         xaxis=dict(title="key (may be read)", side="top", tickangle=-90),
                         yaxis=dict(title="query (reads)", autorange="reversed", scaleanchor="x"))
    return figure


def mask_heatmap(layout: Layout, title: str = "attention mask") -> go.Figure:
    """One mask as a heatmap (query rows x key columns)."""
    return _style(go.Figure(_heatmap(layout)), title)


def describe(layout: Layout) -> str:
    """One line: slots, memory count, and how many (query, key) pairs may attend."""
    allowed = int(layout.attention_mask.sum())
    size = layout.kind.numel()
    return (f"{layout.num_text} text + {layout.num_memory} memory slots ({size} in all); "
            f"{allowed} of {size * size} query-key pairs may attend ({100 * allowed / size ** 2:.0f}%)")


def mask_figure(num_text: int = 16, ratio: int = 4, chunk_size: int = 8) -> go.Figure:
    """A static figure with a dropdown over causal, global, PIC (four option settings) and gist."""
    settings = [("causal", dict(variant="causal")), ("ICAE global", dict(variant="global")),
                ("PIC append", dict(variant="pic")), ("PIC interleave", dict(variant="pic", layout="interleave")),
                ("PIC append + memory reads earlier memory", dict(variant="pic", mem_sees_prev_mem=True)),
                ("PIC interleave, positions restart", dict(variant="pic", layout="interleave", positions="restart")),
                ("gist", dict(variant="gist"))]
    layouts = [layout_for(num_text=num_text, ratio=ratio, chunk_size=chunk_size, **s) for _, s in settings]
    figure = go.Figure([_heatmap(layout, visible=i == 2) for i, layout in enumerate(layouts)])
    buttons = [dict(label=name, method="update",
                    args=[{"visible": [j == i for j in range(len(settings))]},
                          {"title": f"{name}: {describe(layouts[i])}"}]) for i, (name, _) in enumerate(settings)]
    figure.update_layout(updatemenus=[dict(buttons=buttons, active=2, x=0.0, y=1.16, xanchor="left")])
    return _style(figure, f"PIC append: {describe(layouts[2])}")


class MaskWidget(FigurePanel):
    """Controls for the context length, chunk size, ratio, variant and PIC's options; redraws the mask.

    ``controls`` maps "num_text", "chunk_size", "ratio", "variant", "layout", "mem_sees_prev_mem" and
    "positions" to their ipywidgets. A setting the mask builders refuse (a ratio that does not divide the chunk,
    say) shows their error message instead of a figure. Display it as the last expression of a cell.
    """

    def __init__(self, num_text: int = 16, chunk_size: int = 8, ratio: int = 4, variant: str = "pic"):
        import ipywidgets as widgets

        self.controls = {
            "num_text": widgets.IntSlider(value=num_text, min=4, max=48, step=4, description="context"),
            "chunk_size": widgets.IntSlider(value=chunk_size, min=2, max=48, step=2, description="chunk"),
            "ratio": widgets.Dropdown(value=ratio, options=[1, 2, 4, 8, 16], description="ratio"),
            "variant": widgets.ToggleButtons(value=variant, options=list(VARIANT_NAMES), description="mask"),
            "layout": widgets.ToggleButtons(value="append", options=["append", "interleave"], description="layout"),
            "mem_sees_prev_mem": widgets.Checkbox(value=False, description="memory reads earlier memory"),
            "positions": widgets.ToggleButtons(value="continue", options=["continue", "restart"],
                                               description="positions"),
        }
        self.summary, self.output = widgets.Label(), widgets.Output()
        c = self.controls
        self.panel = widgets.VBox([widgets.HBox([c["num_text"], c["chunk_size"], c["ratio"]]), c["variant"],
                                   widgets.HBox([c["layout"], c["mem_sees_prev_mem"]]), c["positions"], self.summary,
                                   self.output])
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self.update()

    def update(self, change=None) -> None:
        """Rebuild the layout and redraw (called by every control)."""
        values = {name: control.value for name, control in self.controls.items()}
        try:
            self.layout = layout_for(**values)
        except ValueError as error:
            self.layout, self.summary.value = None, f"not a valid mask: {error}"
            return
        self.summary.value = describe(self.layout)
        self.draw(mask_heatmap(self.layout, title=f"{values['variant']} mask"))
