"""The mask widget: its heatmap is the builders' mask, controls redraw it, bad settings show the error, and the
static figure holds one heatmap per precomputed variant with a dropdown that shows exactly one."""

import torch

from minimoe.compress.masks import gist_mask, global_mask, pic_mask
from minimoe.widgets.masks import MaskWidget, describe, layout_for, mask_figure, mask_heatmap, slot_names


def test_heatmap_is_the_builders_mask():
    layout = pic_mask(8, 4, 2, "interleave", True)
    figure = mask_heatmap(layout)
    assert torch.equal(torch.tensor(figure.data[0].z), layout.attention_mask[0, 0].int())
    assert list(figure.data[0].x) == slot_names(layout) == ["t0", "t1", "t2", "t3", "m0", "m1",
                                                            "t4", "t5", "t6", "t7", "m2", "m3"]
    assert "m3 (pos 11) reads m0 (pos 4)" in figure.data[0].text[11][4]


def test_layout_for_dispatches_to_the_builders():
    assert all(torch.equal(a, b) for a, b in zip(layout_for("global", 16, 4, 8), global_mask(16, 4)))
    assert all(torch.equal(a, b) for a, b in zip(layout_for("gist", 16, 4, 8), gist_mask(16, 4, 4)))
    assert layout_for("causal", 6, 2, 2).num_memory == 0
    assert describe(global_mask(4, 1)) == "4 text + 1 memory slots (5 in all); 15 of 25 query-key pairs may attend (60%)"


def test_widget_redraws_and_reports_bad_settings():
    widget = MaskWidget(num_text=16, chunk_size=8, ratio=4)
    assert widget.figure.data[0].z is not None and len(widget.figure.data[0].x) == 20
    widget.controls["layout"].value = "interleave"
    assert list(widget.figure.data[0].x)[:6] == ["t0", "t1", "t2", "t3", "t4", "t5"]
    assert list(widget.figure.data[0].x)[8:10] == ["m0", "m1"]
    widget.controls["chunk_size"].value = 6  # 16 is not a multiple of 6
    assert widget.layout is None and "chunk_size 6 does not divide the context of 16 tokens" in widget.summary.value


def test_static_figure_has_one_visible_heatmap_per_button():
    figure = mask_figure(16, 4, 8)
    buttons = figure.layout.updatemenus[0].buttons
    assert len(figure.data) == len(buttons) == 7
    assert [trace.visible for trace in figure.data].count(True) == 1
    for i, button in enumerate(buttons):
        assert button.args[0]["visible"] == [j == i for j in range(7)]
