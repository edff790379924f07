"""Where LESS loses, layer by layer: the per-layer probe that gates candidate states. What
each layer's learned state removes of the sparse policy's error, beside what a rank-r
correction could remove, which half of the state's claim costs the rest, and what LESS in one
layer (or from one layer on) does to the model's perplexity.

* **Shares removed** (the model's real inputs: every layer is read during a full-attention
  forward, :func:`lesskv.hf.methods.observing`): per layer where the policy runs (the local
  layers of a model mixing local and global ones keep their own window: NaN), the sparse error
  ``E = ||O_full - O_sparse||^2`` over the windows' outputs (per query head, ``T x D``), and
  the share ``1 - ||O_full - O_x||^2 / E`` that Baseline+, LESS (the shipped kernels and each
  candidate set) and the rank-r oracle (``O_sparse + truncated_r(O_full - O_sparse)``) remove.
  A layer where LESS removes far less than the oracle is where the kernels, not the rank, are
  the limit.
* **Which claim fails**: full attention is exactly ``(Z·O_kept + M·O_ev) / (Z + M)``, ``Z`` and
  ``M`` the exp-sums of the kept and the evicted pairs' logits, ``O_ev`` the evicted pairs'
  softmax mean. A LESS state claims ``M = den`` and ``O_ev = num / den``
  (:func:`lesskv.core.math.state_summary`); ``mass_exact`` is the share removed with the true
  ``M`` and the state's mean, ``mean_exact`` with the state's mass and the true ``O_ev``.
  ``mean_key_mass``, training-free, counts the evicted pairs at their mean key's weight
  (``n·exp(q·k̄·scale)``) beside the true ``O_ev``; ``matching``, training-free too, is
  attention matching's compaction into as many pseudo-pairs as the state's memory holds
  (:mod:`lesskv.analysis.matching`, a bound: it keeps reference queries a cache would not).
* **End to end**: mean NLL with layer ``l`` alone changed (the others the plain policy) to
  full attention, the oracle, LESS and each candidate, each also as a share of full
  attention's change (``X_only_gap``: the part of the layer's gap X closes, which is what the
  loss feels of ``X_removed``; the oracle's two shares agree, a learned state's need not), and
  LESS in layers ``>= l`` (the plain policy below).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lesskv.analysis.matching import attention_matching
from lesskv.analysis.plots import evicting_budget, plt, save_figure, save_json
from lesskv.core import math as attention_math
from lesskv.core.budget import DEFAULT_RANK, merge_slots_in_state
from lesskv.core.policies import Policy, keep_mask_from_steps
from lesskv.errors import LessKVError
from lesskv.evaluation.perplexity import mean_nll
from lesskv.hf.attention import LayerSetup, layer_output, using_setups
from lesskv.hf.methods import get_method, layer_setups, observing
from lesskv.hf.modules import attention_modules, attention_scale, on_layer_device, policy_layers

# What stands in for the evicted pairs beside each kernel set's own output: the true M or O_ev.
HALVES = ("mass_exact", "mean_exact")
# Names a candidate kernel set cannot take: the report's other rows use them.
RESERVED = ("baseline", "baseline+", "less", "mean_key_mass", "matching", "oracle")
# The top panel's lines (baseline+ C1, less C2, as in the bottom panel); grey is the error's.
LINE_COLORS = ("C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")


@dataclass
class LayerDiagnosis:
    """Per-layer shares of the sparse error removed, and end-to-end NLLs."""

    model: str
    policy: str
    budget: str
    budget_tokens: int
    seq_len: int
    windows: int
    oracle_rank: int
    sparse_error: list[float]  # per layer: sum over windows of ||O_full - O_sparse||^2
    # per-layer share of that error removed by baseline+, each kernel set (less, then the
    # candidates), mean_key_mass and the oracle; NaN where a layer was not probed
    removed: dict[str, list[float]]
    # kernel set -> mass_exact / mean_exact -> per-layer share removed
    decomposed: dict[str, dict[str, list[float]]]
    reference: dict[str, float]  # mean NLL: full, baseline, baseline+, less (empty: not run)
    layers_probed: list[int]  # the end-to-end rows' layers
    # full, oracle, less and each candidate -> mean NLL with that layer alone changed to it
    only: dict[str, list[float]]
    from_layer: list[float]  # mean NLL with LESS in that layer and every one after it
    candidates: dict[str, str] = field(default_factory=dict)  # name -> where its kernels are
    inputs: str = "full"  # the method every layer ran while the shares were measured

    def rows(self) -> list[dict]:
        """One row per layer: the shares, then where that layer was probed the end-to-end
        change of mean NLL against the plain policy with it alone changed (negative: helps),
        each as a share of full attention's change there too (``_gap``: the NLL's analogue
        of ``_removed``), and with LESS from it on."""
        base = self.reference.get("baseline", math.nan)
        probed = {layer: k for k, layer in enumerate(self.layers_probed)}
        rows = []
        for layer, error in enumerate(self.sparse_error):
            row = {"layer": layer, "sparse_error": error}
            for name, shares in self.removed.items():
                row[f"{name}_removed"] = shares[layer]
                row.update(
                    {f"{name}_{h}": s[layer] for h, s in self.decomposed.get(name, {}).items()}
                )
            k = probed.get(layer)
            change = {
                n: nlls[k] - base if k is not None else math.nan for n, nlls in self.only.items()
            }
            row.update({f"{n}_only_dnll": d for n, d in change.items()})
            full = change.get("full", math.nan)
            row.update(
                {
                    f"{n}_only_gap": d / full if full else math.nan
                    for n, d in change.items()
                    if n != "full"
                }
            )
            row["less_from_dnll"] = self.from_layer[k] - base if k is not None else math.nan
            rows.append(row)
        return rows

    def table(self) -> tuple[list[dict], list[str]]:
        """The printed table: the measured layers' rows and their columns, the end-to-end
        ones only where they ran."""
        rows = [row for row in self.rows() if not math.isnan(row["sparse_error"])]
        columns = [c for c in rows[0] if self.reference or not c.endswith(("_dnll", "_gap"))]
        return rows, columns

    def save(self, out_dir: str | Path) -> Path:
        return save_json({**asdict(self), "rows": self.rows()}, Path(out_dir) / "layers.json")


@dataclass(frozen=True)
class Split:
    """One layer's full attention split at the policy's eviction, fp32, grouped ``(B, Hkv, G,
    T, ·)``: the kept and the evicted pairs' softmax output and log-sum-exp each (the evicted
    pairs' are ``O_ev`` and ``log M``), the mean-key estimate of ``log M`` and the step at
    which each pair left the kept set ``(B, Hkv, T)``."""

    kept: tuple[torch.Tensor, torch.Tensor]
    evicted: tuple[torch.Tensor, torch.Tensor]
    mean_key_lse: torch.Tensor
    steps: torch.Tensor

    def full(self) -> torch.Tensor:
        """Full attention, exactly: one softmax over both sets."""
        return attention_math.join_attention(*self.kept, *self.evicted)


def split_attention(
    policy: Policy, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> Split:
    """Split one unpadded sequence's attention ``q: (B, Hkv, G, T, D)`` at the eviction
    ``policy`` makes, ``Z`` and ``M`` kept as log-sum-exps so nothing overflows: ``T x T``
    logits, one layer at a time, for analysis only."""
    t = key.shape[2]
    logits = attention_math.causal_logits(q.float(), key.float(), scale)
    steps = policy.eviction_steps(logits, policy.slots(t), t).expand(*key.shape[:2], t)
    keep = keep_mask_from_steps(steps).unsqueeze(2)
    evicted = torch.ones(t, t, dtype=torch.bool, device=key.device).tril() & ~keep
    kept = attention_math.attention_from_logits(logits.clone(), keep, value.float())
    mean_key_lse = _mean_key_lse(q, key, evicted, scale)
    gone = attention_math.attention_from_logits(logits, evicted, value.float())  # in place
    return Split(kept, gone, mean_key_lse, steps)


def _mean_key_lse(
    q: torch.Tensor, key: torch.Tensor, evicted: torch.Tensor, scale: float
) -> torch.Tensor:
    """``log(n·exp(q·k̄·scale))`` over each query's ``n`` evicted pairs of mean key ``k̄``
    (-inf where none is): the mass a training-free state keeping only their key sum and
    count would claim."""
    weights = evicted.float()
    count = weights.sum(-1, keepdim=True)
    mean_key = (weights @ key.float().unsqueeze(2)) / count.clamp_min(1)
    logit = (q.float() * mean_key).sum(-1, keepdim=True) * scale
    return torch.where(count > 0, count.log() + logit, attention_math.NEG_INF)


def less_outputs(
    split: Split, kernels: nn.Module, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One kernel set's LESS output (``""``: its state's mass and mean, read through the
    form's teacher-forced :meth:`~lesskv.core.forms.StateForm.parallel`, joined to the kept
    pairs) and the same with the true mass (``mass_exact``) or the true mean (``mean_exact``)
    in place of the state's: any state form is probed alike."""
    mean, log_mass = kernels.parallel(q, key, value, split.steps)
    true_mean, true_log_mass = split.evicted
    join = functools.partial(attention_math.join_attention, *split.kept)
    return {
        "": join(mean.float(), log_mass.float()),
        "mass_exact": join(mean.float(), true_log_mass),
        "mean_exact": join(true_mean, log_mass.float()),
    }


def _squared_errors(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    policy: Policy,
    kernel_sets: Mapping[str, nn.Module],
    rank: int,
    oracle_rank: int,
    matching: bool = False,
) -> dict[str, float]:
    """``||O_full - O_x||^2`` on one layer's inputs for the plain policy, Baseline+ (at a
    rank-``rank`` state's memory), the mean-key mass, attention matching (with
    ``matching``), the rank-``oracle_rank`` oracle, and each kernel set (``NAME``,
    ``NAME/mass_exact``, ``NAME/mean_exact``)."""
    scale = attention_scale(module)
    q = attention_math.group_queries(query, key.shape[1])
    split = split_attention(policy, q, key, value, scale)
    plus = get_method("baseline+").layer_setup(policy, module, None, rank)
    outputs = {
        "baseline": split.kept[0],  # the policy's attention over what it kept
        "baseline+": layer_output(plus, query, key, value, scale).float(),
        "mean_key_mass": attention_math.join_attention(
            *split.kept, split.evicted[0], split.mean_key_lse
        ),
    }
    if matching:
        slots = merge_slots_in_state(rank, key.shape[-1])
        matched = attention_matching(q, key, value, split.steps, scale, slots)
        outputs["matching"] = attention_math.join_attention(*split.kept, *matched)
    for name, kernels in kernel_sets.items():
        for half, out in less_outputs(split, kernels, q, key, value).items():
            outputs[f"{name}/{half}" if half else name] = out
    full = split.full()
    errors = {name: (full - out).square().sum().item() for name, out in outputs.items()}
    b, hkv, g, t, d = q.shape
    residual = (full - outputs["baseline"]).reshape(b, hkv * g, t, d)
    rest = residual - attention_math.truncated(residual, oracle_rank)
    errors["oracle"] = rest.square().sum().item()
    return errors


@torch.no_grad()
def sparse_error_shares(
    model: PreTrainedModel,
    windows: torch.Tensor,
    policy: Policy,
    kernel_sets: Mapping[str, Sequence[nn.Module | None]],
    layers: Sequence[int] | None = None,
    rank: int = DEFAULT_RANK,
    oracle_rank: int = 8,
    progress: bool = True,
    matching: bool = False,
    inputs: Mapping[nn.Module, LayerSetup] | None = None,
) -> tuple[list[float], dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """Per layer of ``layers`` (default: every one where the policy runs), the sparse error
    summed over ``windows``, the share of it each of Baseline+, the kernel sets (one module
    per layer, or None: that set lacks the layer), the mean-key mass and the oracle removes,
    and each set's ``mass_exact``/``mean_exact`` shares (see the module's docstring); NaN in
    every other layer."""
    modules = attention_modules(model)
    chosen = policy_layers(model) if layers is None else list(layers)
    totals: dict[int, dict[str, float]] = {i: {} for i in chosen}
    index = {id(module): i for i, module in enumerate(modules)}

    def observe(module: nn.Module, query, key, value) -> None:
        i = index[id(module)]
        present = {
            name: on_layer_device(kernels[i], module)
            for name, kernels in kernel_sets.items()
            if kernels[i] is not None
        }
        errors = _squared_errors(
            module, query, key, value, policy, present, rank, oracle_rank, matching
        )
        for name, error in errors.items():
            totals[i][name] = totals[i].get(name, 0.0) + error

    with observing(model, observe, chosen, inputs):
        for window in tqdm(windows, desc="layer errors", unit="win", disable=not progress):
            model(window[None].to(model.device))
    layer_totals = [totals.get(i, {}) for i in range(len(modules))]
    sparse = [total.get("baseline", math.nan) for total in layer_totals]
    names = ["baseline+", *kernel_sets, "mean_key_mass", *["matching"] * matching, "oracle"]
    removed = {name: [_removed(total, name) for total in layer_totals] for name in names}
    decomposed = {
        name: {
            half: [_removed(total, f"{name}/{half}") for total in layer_totals] for half in HALVES
        }
        for name in kernel_sets
    }
    return sparse, removed, decomposed


def _removed(total: dict[str, float], name: str) -> float:
    """The share of a layer's sparse error that ``name`` removes (NaN where none was
    measured)."""
    if name not in total or not total["baseline"]:
        return math.nan
    return 1 - total[name] / total["baseline"]


@torch.no_grad()
def end_to_end(
    model: PreTrainedModel,
    windows: torch.Tensor,
    policy: Policy,
    kernel_sets: Mapping[str, Sequence[nn.Module | None]],
    layers: Sequence[int],
    oracle_rank: int = 8,
    progress: bool = True,
) -> tuple[dict[str, list[float]], list[float]]:
    """Mean NLL with one layer of ``layers`` changed at a time, the plain policy in every
    other layer where the policy runs: to full attention (the part of the gap that layer
    holds), to the rank-``oracle_rank`` oracle, and to each kernel set (NaN where a set lacks
    the layer); then with the first set (the shipped ``less``) from each layer on."""
    modules = attention_modules(model)
    plain = {modules.index(m): s for m, s in layer_setups(model, "baseline", policy).items()}
    less = get_method("less")
    changes: dict[str, dict[int, LayerSetup | None]] = {
        "full": dict.fromkeys(plain),
        "oracle": {i: replace(s, oracle_rank=oracle_rank) for i, s in plain.items()},
    }
    for name, kernels in kernel_sets.items():
        changes[name] = {
            i: less.layer_setup(
                policy, modules[i], on_layer_device(kernels[i], modules[i]), DEFAULT_RANK
            )
            for i in plain
            if kernels[i] is not None
        }

    def nll(changed: dict[int, LayerSetup | None], chosen: set[int]) -> float:
        if not chosen <= changed.keys():
            bar.update(len(windows))
            return math.nan
        setups = {i: changed[i] if i in chosen else s for i, s in plain.items()}
        kept = {modules[i]: s for i, s in setups.items() if s is not None}
        with using_setups(model, kept):
            return mean_nll(model, windows, bar=bar)

    only: dict[str, list[float]] = {name: [] for name in changes}
    after = []
    total = (len(changes) + 1) * len(layers) * len(windows)
    with tqdm(total=total, desc="one layer changed", unit="win", disable=not progress) as bar:
        for layer in layers:
            for name, changed in changes.items():
                only[name].append(nll(changed, {layer}))
            first = changes[next(iter(kernel_sets))]
            after.append(nll(first, {i for i in plain if i >= layer}))
    return only, after


def diagnose_layers(
    model: PreTrainedModel,
    windows: torch.Tensor,
    policy: Policy,
    kernels: Sequence[nn.Module],
    reference: dict[str, float],
    layer_step: int = 1,
    oracle_rank: int = 8,
    rank: int = DEFAULT_RANK,
    model_name: str = "",
    progress: bool = True,
    candidates: Mapping[str, Sequence[nn.Module | None]] | None = None,
    layers: Sequence[int] | None = None,
    matching: bool = False,
    inputs: str = "full",
) -> LayerDiagnosis:
    """The whole diagnosis over ``windows`` ``(N, T)`` of the layers among ``layers`` (default
    all) where the policy runs, for the shipped ``kernels`` (``less``) and each of
    ``candidates`` (a name, one module or None per layer). ``reference`` holds the mean NLL of
    full, baseline, Baseline+ and LESS on the same windows; end-to-end rows every
    ``layer_step``-th measured layer, none with an empty ``reference`` (the fast probe).
    ``inputs`` is the method every layer runs while the measured ones are read: ``full``
    (clean inputs, what training sees) or ``baseline`` / ``less`` (those at inference)."""
    n, t = windows.shape
    budget_tokens = evicting_budget(policy, t)
    runs = policy_layers(model)
    chosen = [i for i in runs if layers is None or i in layers]
    if not chosen:
        raise LessKVError(f"the policy runs in none of layers {list(layers)} (it runs in {runs})")
    kernel_sets = {"less": kernels, **(candidates or {})}
    running = None if inputs == "full" else layer_setups(model, inputs, policy, kernels, rank)
    sparse, removed, decomposed = sparse_error_shares(
        model, windows, policy, kernel_sets, chosen, rank, oracle_rank, progress, matching, running
    )
    probed = chosen[::layer_step] if reference else []
    only, after = (
        end_to_end(model, windows, policy, kernel_sets, probed, oracle_rank, progress)
        if probed
        else ({}, [])
    )
    return LayerDiagnosis(
        model=model_name or model.config.model_type,
        policy=policy.name,
        budget=str(policy.budget),
        budget_tokens=budget_tokens,
        seq_len=t,
        windows=n,
        oracle_rank=oracle_rank,
        sparse_error=sparse,
        removed=removed,
        decomposed=decomposed,
        reference=reference,
        layers_probed=probed,
        only=only,
        from_layer=after,
        inputs=inputs,
    )


def plot_layers(report: LayerDiagnosis, out_dir: str | Path) -> Path:
    """Top: each layer's share of the sparse error removed (and the error itself, log scale),
    one line per method, kernel set and reference. Bottom, where the end-to-end rows ran: the
    change of mean NLL against the plain policy with LESS in one layer / from one layer on,
    with LESS everywhere and Baseline+ as lines."""
    panels = 2 if report.reference else 1
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.5 * panels), sharex=True, squeeze=False)
    top = axes[0, 0]
    layers = range(len(report.sparse_error))
    labels = {
        "baseline+": "Baseline+ (equal memory)",
        "less": "LESS",
        "mean_key_mass": "mean-key mass, true mean (no training)",
        "matching": "attention matching (no training; a bound)",
        "oracle": f"rank-{report.oracle_rank} oracle",
    }
    for k, (name, shares) in enumerate(report.removed.items()):
        color = LINE_COLORS[k % len(LINE_COLORS)]
        top.plot(layers, shares, "o-", color=color, label=labels.get(name, name), ms=4)
    top.set_ylabel("share of ||O_full - O_sparse||² removed")
    top.grid(alpha=0.3)
    error_axis = top.twinx()
    error_axis.semilogy(layers, report.sparse_error, color="C7", alpha=0.5, label="sparse error")
    error_axis.set_ylabel("sparse error (grey, log)")
    top.legend(fontsize=8, loc="upper left")
    if report.reference:
        _plot_end_to_end(report, axes[1, 0])
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle(
        f"{report.model}: {report.policy} budget {report.budget} ({report.budget_tokens} of "
        f"{report.seq_len} tokens), {report.windows} window(s)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, Path(out_dir) / "layers.png", dpi=110)


def _plot_end_to_end(report: LayerDiagnosis, axis: plt.Axes) -> None:
    """The change of mean NLL with one layer changed (to full attention, the oracle, each
    kernel set) and with LESS from one layer on; every layer's references as lines."""
    base = report.reference["baseline"]
    width = 0.8 / len(report.only)
    for k, (name, nlls) in enumerate(report.only.items()):
        axis.bar(
            [layer - 0.4 + (k + 0.5) * width for layer in report.layers_probed],
            [x - base for x in nlls],
            width,
            color=LINE_COLORS[k % len(LINE_COLORS)] if name != "full" else "C0",
            alpha=0.7,
            label=f"{name} in this layer only",
        )
    axis.plot(
        report.layers_probed,
        [x - base for x in report.from_layer],
        "s-",
        color="C7",
        label="LESS in this layer and after",
    )
    for name, color in (("less", "C2"), ("baseline+", "C1"), ("full", "C0")):
        axis.axhline(
            report.reference[name] - base, color=color, linestyle="--", label=f"{name}, every layer"
        )
    axis.set_ylabel("mean NLL - plain policy's")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
