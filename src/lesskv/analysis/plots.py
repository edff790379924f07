"""Figures a reader would rather look at than read (PNG, matplotlib's headless backend)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lesskv.core.policies import Policy  # noqa: E402
from lesskv.errors import LessKVError  # noqa: E402
from lesskv.evaluation.bench import BENCH_METHODS, BenchRow  # noqa: E402
from lesskv.hf.checkpoint import KernelMeta  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG (creating the folder) and free it: pyplot keeps every open figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def save_json(data: object, path: str | Path) -> Path:
    """Write the data a figure was drawn from as indented JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
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
