"""The rank-r residual oracle (the paper's Fig. 3, right): the perplexity a perfect rank-r
correction of the sparse policy would reach.

Every sparse layer's attention output becomes ``O_sparse + truncated_r(O_full - O_sparse)``,
per batch row and query head over the window's ``T x D`` outputs, from that layer's actual
inputs (:attr:`lesskv.hf.attention.LayerSetup.oracle_rank`), so each layer is fed by the
already-corrected layers before it. No cache can run this (it needs the full output); it says
how much of the sparse policy's loss a rank-r term could recover at best, next to what LESS's
learned rank-R state recovers. ``gap_closed`` is the share of the Baseline+ → full gap in
log-perplexity (mean NLL) that a row closes: 1 is full attention, 0 Baseline+.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from matplotlib.ticker import NullLocator
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lesskv.analysis.plots import evicting_budget, plt, save_figure, save_json
from lesskv.core.policies import Policy
from lesskv.errors import LessKVError
from lesskv.evaluation.perplexity import evaluate_perplexity, mean_nll
from lesskv.hf.attention import using_setups
from lesskv.hf.methods import layer_setups
from lesskv.hf.modules import attention_modules

DEFAULT_RANKS = (0, 1, 2, 4, 8, 16)
REFERENCES = ("full", "baseline", "baseline+", "less")


@dataclass
class OracleReport:
    """Mean NLL of the reference methods (``less`` only with kernels) and of each oracle rank."""

    model: str
    policy: str
    budget: str
    budget_tokens: int
    seq_len: int
    windows: int
    head_dim: int
    reference: dict[str, float]
    ranks: list[int]
    oracle: list[float]

    def gap_closed(self, nll: float) -> float:
        """Share of the Baseline+ → full log-perplexity gap closed by a row of this NLL."""
        gap = self.reference["baseline+"] - self.reference["full"]
        return (self.reference["baseline+"] - nll) / gap if gap else float("nan")

    def rows(self) -> list[dict]:
        """The reference methods, then one row per oracle rank."""
        named = [(method, "", nll) for method, nll in self.reference.items()]
        named += [("oracle", r, nll) for r, nll in zip(self.ranks, self.oracle, strict=True)]
        return [
            {
                "method": m,
                "rank": r,
                "ppl": math.exp(nll),
                "nll": nll,
                "gap_closed": self.gap_closed(nll),
            }
            for m, r, nll in named
        ]

    def save(self, out_dir: str | Path) -> Path:
        return save_json({**asdict(self), "rows": self.rows()}, Path(out_dir) / "oracle.json")


def check_ranks(ranks: Sequence[int], model: PreTrainedModel) -> None:
    """Oracle ranks run from 0 (the plain policy) to the head dimension (full attention)."""
    head_dim = min(module.head_dim for module in attention_modules(model))
    bad = [r for r in ranks if not 0 <= r <= head_dim]
    if not ranks or bad:
        raise LessKVError(
            f"oracle ranks must be between 0 and the head dimension {head_dim}, got "
            f"{', '.join(map(str, bad)) or 'none'}"
        )


@torch.no_grad()
def oracle_perplexity(
    model: PreTrainedModel,
    windows: torch.Tensor,
    policy: Policy,
    ranks: Sequence[int] = DEFAULT_RANKS,
    kernels: Sequence[nn.Module] | None = None,
    batch_size: int = 1,
    model_name: str = "",
    progress: bool = True,
) -> OracleReport:
    """Perplexity over ``windows`` ``(N, T)`` of full, Baseline, Baseline+ (and LESS with
    ``kernels``) and of the policy with every layer's residual replaced by its rank-r part, for
    each of ``ranks``."""
    check_ranks(ranks, model)
    n, t = windows.shape
    budget_tokens = evicting_budget(policy, t)
    methods = [m for m in REFERENCES if m != "less" or kernels is not None]
    results = evaluate_perplexity(
        model, windows, methods, policy, kernels, batch_size=batch_size, progress=progress
    )
    baseline = layer_setups(model, "baseline", policy)
    oracle = []
    with tqdm(total=len(ranks) * n, desc="oracle", unit="win", disable=not progress) as bar:
        for rank in ranks:
            bar.set_postfix(rank=rank)
            setups = {module: replace(s, oracle_rank=rank) for module, s in baseline.items()}
            with using_setups(model, setups):
                oracle.append(mean_nll(model, windows, batch_size, bar))
    return OracleReport(
        model=model_name or model.config.model_type,
        policy=policy.name,
        budget=str(policy.budget),
        budget_tokens=budget_tokens,
        seq_len=t,
        windows=n,
        head_dim=min(module.head_dim for module in attention_modules(model)),
        reference={r.method: r.nll for r in results},
        ranks=list(ranks),
        oracle=oracle,
    )


def plot_oracle(report: OracleReport, out_dir: str | Path) -> Path:
    """Perplexity against the oracle's rank (each point labelled with its share of the gap
    closed), the reference methods as horizontal lines."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ppl = [math.exp(nll) for nll in report.oracle]
    ax.plot(report.ranks, ppl, "o-", color="C3", label="oracle: sparse + rank-r residual")
    for rank, y, nll in zip(report.ranks, ppl, report.oracle, strict=True):
        share = report.gap_closed(nll)
        ax.annotate(
            f"{share:.0%}", (rank, y), textcoords="offset points", xytext=(4, 6), fontsize=8
        )
    styles = {"full": "C0", "baseline": "C7", "baseline+": "C1", "less": "C2"}
    for method, nll in report.reference.items():
        ax.axhline(math.exp(nll), color=styles[method], linestyle="--", label=method)
    ax.set_xscale("symlog", linthresh=1)  # rank 0 (the plain policy) on a log-like axis
    ax.set_xlim(min(report.ranks) - 0.3, max(report.ranks) * 1.3 + 0.3)
    ax.set_xticks(report.ranks, [str(r) for r in report.ranks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(f"rank r of the residual kept (head dimension {report.head_dim})")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        f"{report.model}: {report.policy} budget {report.budget} ({report.budget_tokens} of "
        f"{report.seq_len} tokens), {report.windows} window(s)\nlabels: share of the "
        "Baseline+ → full log-perplexity gap closed",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, Path(out_dir) / "oracle.png", dpi=110)
