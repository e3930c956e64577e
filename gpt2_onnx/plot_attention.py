"""Draw attention maps (engine.attention's arrays) with matplotlib: one head, one layer's heads, or the grid.

Each panel is a [S, S] heat map: row i is the query token, column j the token it attends to, with the
causal triangle above the diagonal empty. Token labels are shown while they stay readable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2_onnx.engine.attention import AttentionMaps
from gpt2_onnx.errors import Gpt2OnnxError

MAX_LABELLED_TOKENS = 40  # beyond this the tick labels overlap
PANEL_INCHES = 2.2


def plot_attention(maps: AttentionMaps, out: str | Path, layer: int | None = None, head: int | None = None) -> Path:
    """Write the chosen panels to `out` (.png, .svg, .pdf); None for layer/head means all of them."""
    plt = _pyplot()
    n_layer, n_head = maps.shape[:2]
    layers = _chosen("layer", layer, n_layer)
    heads = _chosen("head", head, n_head)
    single = len(layers) == len(heads) == 1
    size = 7.0 if single else PANEL_INCHES
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(size * len(heads) + 0.6, size * len(layers) + 0.6),
                             squeeze=False)
    labels = [_label(t) for t in maps.tokens] if single or len(maps.tokens) <= 12 else None
    for r, l in enumerate(layers):
        for c, h in enumerate(heads):
            _panel(axes[r][c], maps.probs[l, h], f"layer {l} head {h}", labels, single)
    fig.suptitle(f"attention over {len(maps.tokens)} tokens (row: query, column: key)")
    fig.tight_layout()
    out = Path(out)
    try:
        fig.savefig(out, dpi=110 if single else 80)
    except (OSError, ValueError) as exc:
        raise Gpt2OnnxError(f"cannot write {out}: {exc}; choose another --out (.png, .svg or .pdf)") from None
    finally:
        plt.close(fig)
    return out


def _panel(ax, probs: np.ndarray, title: str, labels: list[str] | None, large: bool) -> None:
    s = probs.shape[0]
    shown = np.where(np.tril(np.ones((s, s), bool)), probs, np.nan)  # the causal triangle stays blank
    ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize=10 if large else 7)
    if labels and s <= MAX_LABELLED_TOKENS:
        ax.set_xticks(range(s), labels, rotation=90, fontsize=8 if large else 5)
        ax.set_yticks(range(s), labels, fontsize=8 if large else 5)
    else:
        ax.set_xticks([])
        ax.set_yticks([])


def _chosen(what: str, index: int | None, count: int) -> list[int]:
    if index is None:
        return list(range(count))
    if not 0 <= index < count:
        raise Gpt2OnnxError(f"--{what} {index} does not exist: this model has {count} {what}s (0..{count - 1})")
    return [index]


def _label(token: str) -> str:
    return token.replace("\n", "\\n").replace(" ", "·") or "∅"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Gpt2OnnxError("drawing attention needs matplotlib: pip install 'gpt2-onnx[plot]'") from None
    return plt
