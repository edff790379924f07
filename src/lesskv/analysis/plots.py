"""Figures a reader would rather look at than read (PNG, matplotlib's headless backend)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from lesskv.core.policies import Policy  # noqa: E402
from lesskv.errors import LessKVError  # noqa: E402
from lesskv.evaluation.bench import BENCH_METHODS, BenchRow  # noqa: E402
from lesskv.hf.checkpoint import KernelMeta, atomic_write  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` (creating the folder) through a temporary file, so an interrupted run
    leaves no half image, and free it: pyplot keeps every open figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save = dict(format=figure_format(path), dpi=dpi, bbox_inches="tight")
        atomic_write(path, lambda tmp: fig.savefig(tmp, **save))
    finally:
        plt.close(fig)
    return path


def figure_format(path: str | Path) -> str:
    """The image format ``path``'s suffix names (PNG without one), refused when matplotlib
    cannot write it: callers check a figure's path before the work it plots."""
    name = Path(path).suffix.lstrip(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if name not in formats:
        raise LessKVError(
            f"{path}: matplotlib writes no .{name} figures (use {', '.join(sorted(formats))})"
        )
    return name


def save_json(data: object, path: str | Path) -> Path:
    """Write the data a figure was drawn from as indented JSON (creating the folder), through
    a temporary file like the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def evicting_budget(policy: Policy, seq_len: int) -> int:
    """The policy's budget for ``seq_len``-token windows, refused when it keeps them whole:
    an analysis of what eviction loses needs something evicted."""
    tokens = policy.slots(seq_len).total
    if tokens >= seq_len:
        raise LessKVError(
            f"a budget of {tokens} tokens keeps all of a {seq_len}-token window: nothing is "
            "evicted, so there is nothing to analyse"
        )
    return tokens


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


def plot_benchmark(rows: Sequence[BenchRow], path: str | Path) -> Path:
    """Decode throughput and cache MiB against context, one line per (method, batch): the two
    axes on which LESS trades against full attention."""
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, int], list[BenchRow]] = {}
    for row in rows:
        series.setdefault((row.method, row.batch), []).append(row)
    colors = {m: f"C{i}" for i, m in enumerate(BENCH_METHODS)}  # one colour per method
    batches = sorted({row.batch for row in rows})
    markers = "os^Dvp*"  # one marker and dash style per batch size
    for (method, batch), points in sorted(series.items()):
        points = sorted(points, key=lambda r: r.context)
        x = [r.context for r in points]
        i = batches.index(batch)
        style = dict(
            color=colors[method],
            marker=markers[i % len(markers)],
            linestyle=("-", "--", ":", "-.")[i % 4],
            label=f"{method}, batch {batch}",
        )
        speed.plot(x, [r.decode_tokens_per_s for r in points], **style)
        memory.plot(x, [r.cache_bytes / 2**20 for r in points], **style)
    speed.set_ylabel("decode tokens / s (whole batch)")
    memory.set_ylabel("cache MiB (K/V + LESS state)")
    for ax in (speed, memory):
        ax.set_xlabel("context (prompt tokens)")
        ax.grid(alpha=0.3)
    speed.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
