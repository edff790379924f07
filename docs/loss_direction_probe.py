"""What the loss feels of a layer's sparse error: the first-order NLL change of each correction.

`lesskv analyze layers` shows that LESS removes 12-27% of a deep layer's output error yet
moves the NLL by about nothing, while the rank-8 oracle's share of the error and of the NLL
agree. This probe says why. With the plain policy in every layer (the inputs at inference),
it takes the gradient ``g`` of the mean NLL with respect to one layer's attention output
(before ``o_proj``), and scores each correction ``O_x`` of that layer by its first-order NLL
change ``sum g·(O_x - O_plain)``, beside full attention's (``O_full``): the share of the
layer's gap the correction closes to first order. It also reports how the gap spreads over
positions (the share of full attention's first-order gain held by the top 1% / 10% of
positions), and where the gain sits: the evicted pairs' share of attention and the top
evicted key's share of their mass, weighted by the gain and on average.

With ``--fit STEPS`` it also fits a copy of the first kernel set's layer on the scored
windows themselves (a capacity test), or on ``--fit-windows`` windows of ``--fit-data``
(generalisation), twice from the same start: on the
output MSE (how lesskv trains) and on the loss-weighted error ``sum (g·(O_x - O_full))^2``
(plus a tenth of the MSE), and scores both, with their real NLL change (that layer alone
changed, the plain policy elsewhere) beside full attention's.

    OMP_NUM_THREADS=1 python docs/loss_direction_probe.py --layers 17 20 23 --windows 4
    OMP_NUM_THREADS=1 python docs/loss_direction_probe.py --layers 23 --fit 300
    OMP_NUM_THREADS=1 python docs/loss_direction_probe.py --layers 23 --fit 150 \
        --fit-data ../shared/data/c4/c4_en_train_first1000.jsonl --fit-windows 8
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from lesskv.analysis.candidates import load_candidate
from lesskv.analysis.layers import end_to_end, less_outputs, split_attention
from lesskv.cli.common import load_kernels
from lesskv.core import math as attention_math
from lesskv.core.policies import keep_mask_from_steps, make_policy
from lesskv.data import load_texts, token_windows
from lesskv.evaluation.perplexity import mean_nll
from lesskv.hf.attention import using_setups
from lesskv.hf.loading import load_model
from lesskv.hf.methods import layer_setups, observing
from lesskv.hf.modules import attention_modules, attention_scale


def layer_gradient(model, window, setups, module):
    """The NLL's gradient at ``module``'s attention output ``(1, Hkv, G, T, D)`` and the
    layer's grouped query, key and value, with ``setups`` running."""
    seen, grabbed = [], []

    def grab(_, args):
        x = args[0].detach().requires_grad_(True)
        grabbed.append(x)
        return (x, *args[1:])

    hook = module.o_proj.register_forward_pre_hook(grab)
    layer = attention_modules(model).index(module)
    try:
        with observing(model, lambda *call: seen.append(call), [layer], setups):
            ids = window[None]
            loss = model(ids, labels=ids).loss
        loss.backward()
    finally:
        hook.remove()
    _, query, key, value = seen[0]
    t, d = query.shape[2], query.shape[3]
    g = grabbed[0].grad.view(1, t, -1, d).transpose(1, 2)
    kv = key.shape[1]
    return (
        attention_math.group_queries(g, kv),
        attention_math.group_queries(query.detach(), kv),
        key.detach(),
        value.detach(),
    )


def read_layer(model, windows, plain, module, policy):
    """Per window: the gradient, the layer's inputs and its attention split at eviction."""
    reads = []
    for window in windows:
        g, q, key, value = layer_gradient(model, window, plain, module)
        with torch.no_grad():
            split = split_attention(policy, q, key, value, attention_scale(module))
        reads.append((g, q, key, value, split))
    return reads


@torch.no_grad()
def recall_stats(split, q, key, scale, gain):
    """Sums over (head, position) of: the evicted pairs' share of attention and the top
    evicted key's share of their mass, each weighted by full attention's first-order gain
    there (its positive part) and unweighted; the weights' sum and the count."""
    lse_kept, lse_ev = split.kept[1].squeeze(-1), split.evicted[1].squeeze(-1)
    share = torch.exp(lse_ev - torch.logaddexp(lse_kept, lse_ev)).nan_to_num(0.0)
    logits = attention_math.causal_logits(q.float(), key.float(), scale)
    evicted = ~keep_mask_from_steps(split.steps).unsqueeze(2) & (logits > attention_math.NEG_INF)
    top = logits.masked_fill(~evicted, attention_math.NEG_INF).amax(-1)
    top_share = torch.exp(top - lse_ev).nan_to_num(0.0)
    weight = (-gain.sum(-1)).clamp_min(0)
    some = evicted.any(-1)
    return (
        (weight * share).sum().item(),
        weight.sum().item(),
        share[some].sum().item(),
        (weight * top_share).sum().item(),
        top_share[some].sum().item(),
        some.sum().item(),
    )


def weighted_error(g: torch.Tensor, error: torch.Tensor, per_head: bool) -> torch.Tensor:
    """``Σ (g·error)²`` per (head, position), or per position (``g·error`` summed over the
    heads first: each token's first-order NLL change, which ``o_proj``'s output gradient
    gives alone)."""
    dims = (-1,) if per_head else (1, 2, 4)
    return (g * error).sum(dims).square().sum()


def fit(kernels, reads, weighted: bool, steps: int, lr: float = 3e-3, per_head: bool = True):
    """A copy of ``kernels`` fitted on ``reads`` to the output MSE, or (``weighted``) to the
    loss-weighted error (:func:`weighted_error`) plus a tenth of the MSE, each relative to the
    plain policy's."""
    fitted = copy.deepcopy(kernels).float().eval().requires_grad_(True)
    optimizer = torch.optim.Adam(fitted.parameters(), lr=lr)
    scales = []
    for g, _q, _k, _v, split in reads:
        e0 = split.full() - split.kept[0]
        scales.append((weighted_error(g, e0, per_head), e0.square().sum()))
    for _ in range(steps):
        optimizer.zero_grad()
        for (g, q, key, value, split), (gain0, mse0) in zip(reads, scales, strict=True):
            error = split.full() - less_outputs(split, fitted, q, key, value)[""]
            loss = error.square().sum() / mse0
            if weighted:
                loss = weighted_error(g, error, per_head) / gain0 + 0.1 * loss
            (loss / len(reads)).backward()
        optimizer.step()
    return fitted.requires_grad_(False)


def probe_table(layer, reads, sets, module):
    """The table's rows for one layer (see the module's docstring)."""
    totals: dict[str, list[float]] = {}
    top_mass, where = [0.0, 0.0], [0.0] * 6
    for g, q, key, value, split in reads:
        with torch.no_grad():
            full, base = split.full(), split.kept[0]
            residual = (full - base).reshape(1, -1, *full.shape[-2:])
            outs = {
                "full": full,
                "oracle": base + attention_math.truncated(residual, 8).reshape(full.shape),
            }
            for name, kernels in sets.items():
                if kernels[layer] is not None:
                    for half, out in less_outputs(split, kernels[layer], q, key, value).items():
                        outs[f"{name}/{half}" if half else name] = out
            gain = g * (full - base)
            for k, part in enumerate(recall_stats(split, q, key, attention_scale(module), gain)):
                where[k] += part
            gain_t = gain.sum((0, 1, 2, 4))  # per position
            order = gain_t.abs().argsort(descending=True)
            top = order[: max(1, len(order) // 10)]
            top_mass[0] += gain_t[order[: max(1, len(order) // 100)]].sum().item()
            top_mass[1] += gain_t[top].sum().item()
            err0 = (full - base).square().sum((0, 1, 2, 4))
            for name, out in outs.items():
                err = (full - out).square().sum((0, 1, 2, 4))
                row = totals.setdefault(name, [0.0] * 5)
                for k, part in enumerate(
                    (
                        (g * (out - base)).sum(),
                        err.sum(),
                        err0.sum(),
                        err[top].sum(),
                        err0[top].sum(),
                    )
                ):
                    row[k] += part.item()
    whole = totals["full"][0]
    for name, (d, err, err0, err_top, err0_top) in totals.items():
        print(
            f"| {layer} | {name} | {d / len(reads):+.4f} | {d / whole:.1%} | {1 - err / err0:.1%} "
            f"| {1 - err_top / err0_top:.1%} |"
        )
    print(
        f"| {layer} | top 1% / 10% positions hold | {top_mass[0] / whole:.1%} / "
        f"{top_mass[1] / whole:.1%} of full's first-order gain | | | |"
    )
    print(
        f"| {layer} | evicted share of attention, gain-weighted / mean | "
        f"{where[0] / where[1]:.3f} / {where[2] / where[5]:.3f} | | | |"
    )
    print(
        f"| {layer} | top evicted key's share of the evicted mass, gain-weighted / mean | "
        f"{where[3] / where[1]:.3f} / {where[4] / where[5]:.3f} | | | |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default="h2o")
    parser.add_argument("--budget", default="0.1")
    parser.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--layers", type=int, nargs="+", default=[17, 20, 23])
    parser.add_argument("--kernels", default=None, help="a kernel folder (default: shipped)")
    parser.add_argument("--candidates", nargs="*", default=[], metavar="NAME=FOLDER")
    parser.add_argument("--fit", type=int, default=0, metavar="STEPS")
    parser.add_argument(
        "--fit-data", default=None, help="fit on windows of this text (default: the scored ones)"
    )
    parser.add_argument("--fit-windows", type=int, default=8)
    parser.add_argument(
        "--fits",
        default="mse-fit,loss-fit",
        help="which fits: mse-fit, loss-fit (weighted per head), position-fit (per position)",
    )
    args = parser.parse_args()
    budget = float(args.budget) if "." in args.budget else int(args.budget)
    policy = make_policy(args.policy, budget)
    model, tokenizer = load_model(args.model)
    model.requires_grad_(False)
    shipped = load_kernels(args.kernels, args.model, model, policy, args.seq_len)
    sets = {"less": list(shipped.layers)}
    for spec in args.candidates:
        name, folder = spec.split("=", 1)
        sets[name] = load_candidate(Path(folder), model, policy)
    windows = token_windows(
        tokenizer, load_texts(args.data), args.seq_len, max_windows=args.windows
    )
    plain = layer_setups(model, "baseline", policy)
    modules = attention_modules(model)
    header = (
        "| layer | x | first-order dNLL | share of full's | error removed "
        "| error removed, top-10% positions |"
    )
    for layer in args.layers:
        print(header + "\n|---|---|---|---|---|---|")
        reads = read_layer(model, windows, plain, modules[layer], policy)
        fit_reads = reads
        if args.fit and args.fit_data:
            fit_windows = token_windows(
                tokenizer, load_texts(args.fit_data), args.seq_len, max_windows=args.fit_windows
            )
            fit_reads = read_layer(model, fit_windows, plain, modules[layer], policy)
        start = next(iter(sets.values()))[layer]
        fitted = {}
        kinds = {"mse-fit": (False, True), "loss-fit": (True, True), "position-fit": (True, False)}
        for name in args.fits.split(",") if args.fit else ():
            weighted, per_head = kinds[name]
            fitted[name] = [None] * len(modules)
            fitted[name][layer] = fit(start, fit_reads, weighted, args.fit, per_head=per_head)
        probe_table(layer, reads, {**sets, **fitted}, modules[layer])
        if fitted:
            only, _ = end_to_end(
                model, windows, policy, {**sets, **fitted}, [layer], progress=False
            )
            with using_setups(model, plain), torch.no_grad():
                base = mean_nll(model, windows)
            gap = only["full"][0] - base
            changes = [
                f"{n} {v[0] - base:+.4f} ({(v[0] - base) / gap:.1%})" for n, v in only.items()
            ]
            print("real NLL change, that layer alone: " + ", ".join(changes))


if __name__ == "__main__":
    main()
