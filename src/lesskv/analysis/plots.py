"""Figures a reader would rather look at than read (PNG, matplotlib's headless backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lesskv.hf.checkpoint import KernelMeta  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG (creating the folder) and free it: pyplot keeps every open figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_layer_losses(meta: KernelMeta, path: str | Path) -> Path:
    """Per-layer validation MSE of LESS vs Baseline+ (log scale: layers differ by 10^4)."""
    layers = sorted(int(k) for k in meta.val_loss)
    less = [meta.val_loss[str(i)] for i in layers]
    plus = [meta.baseline_plus_val_loss[str(i)] for i in layers]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.semilogy(layers, plus, "o-", label="Baseline+ (policy + pairs of equal memory)")
    ax.semilogy(layers, less, "s-", label=f"LESS (rank {meta.rank})")
    ax.set_xlabel("layer")
    ax.set_ylabel("validation MSE of o_proj output")
    ax.set_title(f"{meta.model}: {meta.policy} budget {meta.budget}, {meta.seq_len}-token windows")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
