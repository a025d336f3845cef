"""Draw the book's concept diagrams: static PNG files in book/figures/, one per idea a reader would rather see.

    python tools/draw_figures.py            # (re)writes every figure
    python tools/draw_figures.py two_hosts  # only the ones named

The chapters show them with a markdown image (``![...](figures/NAME.png)``), which the built site, JupyterLab and
the repository's web view all display. These are drawings of ideas (boxes and arrows), not results: the results
are plotly figures computed in the chapters. Needs matplotlib (the ``outputs`` extra).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

FIGURES = Path(__file__).resolve().parents[1] / "book" / "figures"
DPI = 110
BLUE, ORANGE, GREEN, GREY, RED, PURPLE = "#cfe2f3", "#fce5cd", "#d9ead3", "#eeeeee", "#f4cccc", "#d9d2e9"
EDGE = "#444444"


def canvas(width: float, height: float):
    figure, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    return figure, ax


def box(ax, x, y, w, h, text, color=BLUE, size=10, bold=False, edge=EDGE, style="round,pad=0.02,rounding_size=0.08",
        line=1.0, va="center"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=color, edgecolor=edge, linewidth=line))
    if text:
        ty = y + h / 2 if va == "center" else y + h - 0.18
        ax.text(x + w / 2, ty, text, ha="center", va=va, fontsize=size, fontweight="bold" if bold else "normal")


def arrow(ax, x0, y0, x1, y1, color=EDGE, width=1.2, style="-|>", text=None, size=9, both=False, dashed=False):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="<|-|>" if both else style, mutation_scale=12,
                                 color=color, linewidth=width, linestyle="--" if dashed else "-",
                                 shrinkA=0, shrinkB=0))
    if text:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, text, ha="center", va="bottom", fontsize=size, color=color)


def save(figure, name: str) -> Path:
    """Write the figure as a PNG of at most 64 colours (a diagram needs no more; the file is a third the size)."""
    from PIL import Image

    path = FIGURES / f"{name}.png"
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI, bbox_inches="tight", pad_inches=0.05)
    plt.close(figure)
    image = Image.open(buffer).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)
    return path


def dense_block():
    """Chapter 1: the Llama 3 block, pre-norm residual, with the shapes that flow through it."""
    figure, ax = canvas(10.6, 3.6)
    y, h = 1.2, 1.0
    box(ax, 0.1, y, 1.0, h, "x\n(B, T, H)", GREY)
    box(ax, 1.5, y, 1.1, h, "RMSNorm", GREEN)
    box(ax, 3.0, y, 1.9, h, "attention\nGQA: $n_h$ q, $n_{kv}$ kv\nRoPE on q, k", BLUE, size=9)
    box(ax, 5.3, y + 0.25, 0.5, 0.5, "+", "white", size=12, style="circle,pad=0.02")
    box(ax, 6.1, y, 1.1, h, "RMSNorm", GREEN)
    box(ax, 7.6, y, 1.3, h, "SwiGLU\nH → F → H", ORANGE, size=9)
    box(ax, 9.2, y + 0.25, 0.5, 0.5, "+", "white", size=12, style="circle,pad=0.02")
    for x0, x1 in ((1.1, 1.5), (2.6, 3.0), (4.9, 5.3), (5.8, 6.1), (7.2, 7.6), (8.9, 9.2), (9.7, 10.5)):
        arrow(ax, x0, y + h / 2, x1, y + h / 2)
    ax.text(10.1, y + h / 2 + 0.1, "(B, T, H)", fontsize=8, ha="center", va="bottom")
    ax.plot([1.3, 1.3, 5.55], [y + h / 2, y + h + 0.3, y + h + 0.3], color=EDGE, lw=1.2)  # residual 1
    arrow(ax, 5.55, y + h + 0.3, 5.55, y + 0.75)
    ax.text(2.1, y + h + 0.36, "residual", fontsize=9, ha="center")
    ax.plot([5.95, 5.95, 9.45], [y + h / 2, y - 0.35, y - 0.35], color=EDGE, lw=1.2)  # residual 2
    arrow(ax, 9.45, y - 0.35, 9.45, y + 0.25)
    ax.text(7.6, y - 0.3, "residual", fontsize=9, ha="center")
    box(ax, 3.2, 2.85, 1.5, 0.5, "KV cache", PURPLE, size=9)
    arrow(ax, 3.95, 2.85, 3.95, y + h, both=True)
    ax.text(0.1, 0.2, "one of L blocks; the model: embedding → L blocks → RMSNorm → output head (B, T, V)",
            fontsize=9)
    return save(figure, "dense_block")


def moe_data_flow():
    """Chapter 2: one token through a MoE layer: router scores, top-k, experts, weighted sum."""
    figure, ax = canvas(9.0, 4.8)
    mid = 2.75
    box(ax, 0.1, mid - 0.4, 1.0, 0.8, "token x\n(H,)", GREY)
    box(ax, 1.5, mid - 0.4, 1.3, 0.8, "router\n$W_r x$ → scores", GREEN, size=9)
    arrow(ax, 1.1, mid, 1.5, mid)
    chosen = {1: 0.7, 5: 0.3}
    for e in range(8):
        yy = 4.3 - e * 0.45
        color = ORANGE if e in chosen else GREY
        box(ax, 4.2, yy, 1.2, 0.36, f"expert {e}", color, size=9, bold=e in chosen)
        if e in chosen:
            arrow(ax, 2.8, mid, 4.2, yy + 0.18)
            ax.text(3.3, (mid + yy + 0.18) / 2 + 0.1, f"w = {chosen[e]}", fontsize=9, color="#b45f06")
            arrow(ax, 5.4, yy + 0.18, 6.6, mid)
    ax.text(1.6, 4.45, "top-k of the E scores\n(here k = 2 of E = 8):\nonly the chosen experts run", fontsize=9,
            ha="center", va="top")
    box(ax, 6.6, mid - 0.4, 1.1, 0.8, "Σ w·expert(x)", BLUE, size=9)
    box(ax, 6.6, 0.1, 1.1, 0.7, "shared\nexpert", PURPLE, size=9)
    ax.plot([0.6, 0.6, 6.6], [mid - 0.4, 0.45, 0.45], color=EDGE, lw=1.2, ls="--")
    ax.text(2.4, 0.55, "every token (DeepSeek, Llama 4)", fontsize=8, color=EDGE, ha="center")
    arrow(ax, 7.15, 0.8, 7.15, mid - 0.4)
    box(ax, 8.0, mid - 0.4, 0.9, 0.8, "y\n(H,)", GREY)
    arrow(ax, 7.7, mid, 8.0, mid)
    return save(figure, "moe_data_flow")


def training_pipeline():
    """Chapter 3: offline corpora to a trained MoE and its per-domain routing."""
    figure, ax = canvas(9.4, 2.9)
    for i, (name, color) in enumerate((("code", BLUE), ("math", ORANGE), ("chat", GREEN), ("general", PURPLE))):
        box(ax, 0.1, 2.15 - i * 0.6, 1.2, 0.45, name, color, size=9)
        arrow(ax, 1.3, 2.37 - i * 0.6, 1.8, 1.3)
    box(ax, 1.8, 0.9, 1.5, 0.8, "split by\ndocument\n90 / 5 / 5", GREY, size=9)
    box(ax, 3.7, 0.9, 1.3, 0.8, "byte-level\nBPE", GREEN, size=9)
    box(ax, 5.4, 0.9, 1.6, 0.8, "MoE LM\n(router + experts\nper layer)", BLUE, size=9)
    box(ax, 7.4, 1.5, 1.9, 0.6, "loss: CE + aux\n(balance, z)", RED, size=9)
    box(ax, 7.4, 0.35, 1.9, 0.75, "routing per domain\n→ traces (ch. 4)", ORANGE, size=9)
    for x0, x1 in ((3.3, 3.7), (5.0, 5.4)):
        arrow(ax, x0, 1.3, x1, 1.3)
    arrow(ax, 7.0, 1.45, 7.4, 1.8)
    arrow(ax, 7.0, 1.15, 7.4, 0.75)
    ax.plot([8.35, 8.35, 6.2], [2.1, 2.45, 2.45], color=EDGE, lw=1.2, ls="--")
    arrow(ax, 6.2, 2.45, 6.2, 1.7, dashed=True)
    ax.text(7.3, 2.52, "gradients (AdamW)", fontsize=8, ha="center")
    return save(figure, "training_pipeline")


def placement_nodes():
    """Chapter 6: the same tokens under two placements; a node boundary crossed or not."""
    figure, ax = canvas(9.0, 3.2)
    for column, (title, layout, crossings) in enumerate((
            ("contiguous: experts by id", [[0, 1, 2, 3], [4, 5, 6, 7]], "token → 2 nodes"),
            ("locality: co-activated experts together", [[0, 2, 5, 7], [1, 3, 4, 6]], "token → 1 node"))):
        x0 = 0.1 + column * 4.6
        ax.text(x0 + 2.1, 2.95, title, ha="center", fontsize=10, fontweight="bold")
        for node in range(2):
            box(ax, x0 + node * 2.15, 1.0, 2.0, 1.6, "", "white", style="round,pad=0.02,rounding_size=0.1")
            ax.text(x0 + node * 2.15 + 1.0, 2.4, f"node {node}", ha="center", fontsize=9)
            for j, expert in enumerate(layout[node]):
                hot = expert in (0, 5)
                box(ax, x0 + node * 2.15 + 0.12 + j * 0.46, 1.5, 0.4, 0.6, f"{expert}", ORANGE if hot else GREY,
                    size=9, bold=hot)
        box(ax, x0 + 0.5, 0.1, 1.1, 0.45, "token: {0, 5}", BLUE, size=8)
        ax.text(x0 + 2.1, 0.72, crossings, ha="center", fontsize=9, color="#b45f06")
        nodes = [n for n in range(2) if {0, 5} & set(layout[n])]
        for n in nodes:
            arrow(ax, x0 + 1.05, 0.55, x0 + n * 2.15 + 1.0, 1.0, color="#b45f06")
    return save(figure, "placement_nodes")


def grouping():
    """Chapter 7: requests steered to the node that holds the experts their prompt used."""
    figure, ax = canvas(9.0, 3.0)
    requests = (("code request", "experts {0, 2}", BLUE, 0), ("math request", "experts {5, 7}", ORANGE, 1),
                ("code request", "experts {0, 3}", BLUE, 0))
    for i, (name, sig, color, node) in enumerate(requests):
        yy = 2.2 - i * 0.85
        box(ax, 0.1, yy, 1.9, 0.6, f"{name}\nprefill: {sig}", color, size=8)
        arrow(ax, 2.0, yy + 0.3, 5.3, 2.05 - node * 1.25 + 0.35, color=EDGE)
    ax.text(3.6, 2.85, "grouped by the experts each prompt used", fontsize=9, ha="center", color=EDGE)
    for node, experts in enumerate(("experts 0-3", "experts 4-7")):
        box(ax, 5.3, 1.9 - node * 1.25, 3.5, 0.95, "", "white")
        ax.text(7.05, 2.6 - node * 1.25, f"node {node}: {experts}", ha="center", fontsize=9, fontweight="bold")
        for g in range(2):
            box(ax, 5.5 + g * 1.65, 1.98 - node * 1.25, 1.45, 0.42, f"GPU {2 * node + g}", GREY, size=8)
    ax.text(5.3, 0.15, "decode tokens then find most of their experts on their own node", fontsize=9)
    return save(figure, "grouping")


def two_hosts():
    """Chapter 9: two hosts of four GPUs, global and local ranks, the two kinds of links."""
    figure, ax = canvas(9.0, 4.3)
    for host in range(2):
        x0 = 0.1 + host * 4.6
        box(ax, x0, 0.75, 4.2, 2.95, "", "white", style="round,pad=0.02,rounding_size=0.12", line=1.3)
        ax.text(x0 + 2.1, 3.45, f"host {host}: one torchrun, 4 processes", ha="center", fontsize=9,
                fontweight="bold")
        box(ax, x0 + 0.15, 2.75, 3.9, 0.35, "NVLink / NVSwitch (intra-node: leg B)", GREEN, size=8)
        for j in range(4):
            rank = host * 4 + j
            gx = x0 + 0.15 + j * 1.0
            box(ax, gx, 1.75, 0.9, 0.85, f"rank {rank}\nlocal {j}", BLUE, size=9, bold=True)
            ax.plot([gx + 0.45, gx + 0.45], [2.6, 2.75], color=EDGE, lw=1)
            box(ax, gx + 0.1, 1.0, 0.7, 0.4, f"NIC {j}", ORANGE, size=8)
            ax.plot([gx + 0.45, gx + 0.45], [1.4, 1.75], color=EDGE, lw=1)
    box(ax, 3.0, 0.3, 3.0, 0.35, "InfiniBand / RoCE switch (inter-node: leg A)", RED, size=8)
    for host in range(2):
        for j in range(4):
            gx = 0.1 + host * 4.6 + 0.15 + j * 1.0 + 0.45
            rail0 = j == 0
            ax.plot([gx, gx, 4.5], [1.0, 0.8, 0.65], color="#990000", lw=2.2 if rail0 else 0.6,
                    alpha=1.0 if rail0 else 0.5)
    ax.text(4.5, 0.02, "rail 0: rank 0 <-> rank 4, the same local rank on each host (one NIC each)", ha="center",
            fontsize=8, color="#990000")
    ax.text(4.5, 3.95, "rendezvous: --rdzv_backend=c10d --rdzv_endpoint=host0:29500 (the same on both hosts)",
            ha="center", fontsize=9)
    return save(figure, "two_hosts")


def dispatch_buffers():
    """Chapter 5: dispatch per (token, rank) on 3 ranks: each rank packs one buffer per destination, one
    exchange delivers them, the experts run, the reverse exchange brings the results home to be summed."""
    figure, ax = canvas(10.6, 4.2)
    colors = (BLUE, ORANGE, GREEN)
    ax.text(0.1, 3.95, "tokens on rank 0", fontsize=9)
    tokens = [("t0", (0, 1)), ("t1", (2,)), ("t2", (1, 2)), ("t3", (0,))]
    for i, (name, ranks) in enumerate(tokens):
        box(ax, 0.1, 3.1 - i * 0.75, 0.7, 0.55, name, GREY, size=9)
        ax.text(0.9, 3.37 - i * 0.75, ("→ ranks " if len(ranks) > 1 else "→ rank ") + ", ".join(map(str, ranks)),
                fontsize=8, va="center")
    ax.text(2.75, 3.95, "send buffers, one per destination", fontsize=9)
    for r, color in enumerate(colors):
        members = [name for name, ranks in tokens if r in ranks]
        box(ax, 2.75, 3.0 - r * 1.05, 2.1, 0.8, f"to rank {r}: " + " ".join(members), color, size=9)
        arrow(ax, 4.85, 3.4 - r * 1.05, 6.0, 3.4 - r * 1.05)
    ax.text(5.0, 3.6, "all-to-all", fontsize=9, color=EDGE)
    ax.text(6.0, 3.95, "each rank: its experts on what it received", fontsize=9)
    for r, color in enumerate(colors):
        box(ax, 6.0, 3.0 - r * 1.05, 2.2, 0.8, f"rank {r}: local experts", color, size=9)
        arrow(ax, 8.2, 3.4 - r * 1.05, 9.0, 3.4 - r * 1.05, dashed=True)
    box(ax, 9.0, 1.0, 1.5, 2.8, "reverse\nall-to-all,\nthen\nΣ w · E(x)\nper token", PURPLE, size=9)
    ax.text(0.1, 0.1, "counts first (how many rows each rank receives), then the rows; a token goes to a rank once "
            "however many of its experts live there", fontsize=8)
    return save(figure, "dispatch_buffers")


def compressor_pipeline():
    """Chapter 8: context + memory tokens through the LM with LoRA (encoder, masked), the memory (last hidden
    states as input embeddings, or keys and values in every layer) handed to the same LM without LoRA (decoder)."""
    figure, ax = canvas(10.6, 3.6)
    box(ax, 0.1, 2.2, 2.3, 0.7, "context (n tokens)", GREY, size=9)
    box(ax, 0.1, 1.2, 2.3, 0.7, "k memory tokens\n(learned, k = n / ratio)", PURPLE, size=9)
    box(ax, 3.0, 1.1, 2.6, 1.9, "encoder: the LM + LoRA\none pass under the mask\n(global or PIC)", BLUE, size=9)
    arrow(ax, 2.4, 2.55, 3.0, 2.3)
    arrow(ax, 2.4, 1.55, 3.0, 1.8)
    box(ax, 6.2, 1.1, 1.7, 1.9, "memory: its last\nhidden states, or\nits keys / values\nin every layer", PURPLE,
        size=8)
    arrow(ax, 5.6, 2.05, 6.2, 2.05)
    box(ax, 8.5, 1.1, 2.0, 1.9, "decoder: the same LM,\nLoRA off (frozen)\nreads memory, then\nbos + question", ORANGE,
        size=9)
    arrow(ax, 7.9, 2.05, 8.5, 2.05)
    arrow(ax, 9.5, 1.1, 9.5, 0.55)
    ax.text(9.5, 0.3, "answer", ha="center", fontsize=9)
    ax.text(0.1, 0.3, "trained: LoRA and the memory tokens only; the loss is the decoder's, on the answer "
            "(and on addressed repeats)", fontsize=8)
    return save(figure, "compressor_pipeline")


DRAWINGS = {f.__name__: f for f in (dense_block, moe_data_flow, training_pipeline, placement_nodes, grouping,
                                     two_hosts, dispatch_buffers, compressor_pipeline)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[[], *DRAWINGS], help="figures to draw (default: all)")
    args = parser.parse_args(argv)
    FIGURES.mkdir(parents=True, exist_ok=True)
    for name in args.names or DRAWINGS:
        path = DRAWINGS[name]()
        print(f"{path.relative_to(FIGURES.parents[1])}: {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
