"""What the loss feels of a layer's sparse error: the first-order NLL change of each correction.

`lesskv analyze layers` shows that LESS removes 12-27% of a deep layer's output error yet
moves the NLL by about nothing, while the rank-8 oracle's share of the error and of the NLL
agree. This probe says why. With the plain policy in every layer (the inputs at inference),
it takes the gradient ``g`` of the mean NLL with respect to one layer's attention output
(before ``o_proj``), and scores each correction ``O_x`` of that layer by its first-order NLL
change ``sum g·(O_x - O_plain)``, beside full attention's (``O_full``): the share of the
layer's gap the correction closes to first order. It also reports how the gap spreads over
positions (the share of full attention's first-order gain held by the top 1% / 10% of
positions) and how much of each correction's error reduction falls where the loss looks.

    OMP_NUM_THREADS=1 python docs/loss_direction_probe.py --layers 17 20 23 --windows 4
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from lesskv.analysis.candidates import load_candidate
from lesskv.analysis.layers import less_outputs, split_attention
from lesskv.cli.common import load_kernels
from lesskv.core import math as attention_math
from lesskv.core.policies import keep_mask_from_steps, make_policy
from lesskv.data import load_texts, token_windows
from lesskv.hf.attention import using_setups
from lesskv.hf.loading import load_model
from lesskv.hf.methods import layer_setups
from lesskv.hf.modules import attention_modules, attention_scale


def layer_gradient(model, window, setups, module):
    """The NLL's gradient at ``module``'s attention output ``(1, Hkv, G, T, D)`` and the
    layer's post-RoPE query, key and value, with ``setups`` running."""
    seen, grabbed = [], []

    def grab(_, args):
        x = args[0].detach().requires_grad_(True)
        grabbed.append(x)
        return (x, *args[1:])

    hook = module.o_proj.register_forward_pre_hook(grab)
    observed = {**setups, module: replace(setups[module], observer=lambda *c: seen.append(c))}
    try:
        with using_setups(model, observed):
            ids = window[None]
            loss = model(ids, labels=ids).loss
        loss.backward()
    finally:
        hook.remove()
    _, query, key, value = seen[0]
    t, d = query.shape[2], query.shape[3]
    g = grabbed[0].grad.view(1, t, -1, d).transpose(1, 2)
    return attention_math.group_queries(g, key.shape[1]), query.detach(), key, value


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
    print(
        "| layer | x | first-order dNLL | share of full's | error removed | "
        "error removed, top-10% positions |"
    )
    print("|---|---|---|---|---|---|")
    for layer in args.layers:
        module = modules[layer]
        totals: dict[str, list[float]] = {}
        top_mass = [0.0, 0.0]
        where = [0.0] * 6
        for window in windows:
            g, query, key, value = layer_gradient(model, window, plain, module)
            with torch.no_grad():
                q = attention_math.group_queries(query, key.shape[1])
                split = split_attention(policy, q, key, value, attention_scale(module))
                full, base = split.full(), split.kept[0]
                residual = (full - base).reshape(1, -1, *full.shape[-2:])
                outs = {
                    "full": full,
                    "oracle": base + attention_math.truncated(residual, 8).reshape(full.shape),
                }
                for name, kernels in sets.items():
                    if kernels[layer] is None:
                        continue
                    for half, out in less_outputs(split, kernels[layer], q, key, value).items():
                        outs[f"{name}/{half}" if half else name] = out
                recall = recall_stats(split, q, key, attention_scale(module), g * (full - base))
                for k, value_ in enumerate(recall):
                    where[k] += value_
                gain_t = (g * (full - base)).sum((0, 1, 2, 4))  # per position
                order = gain_t.abs().argsort(descending=True)
                k1, k10 = max(1, len(order) // 100), max(1, len(order) // 10)
                top_mass[0] += gain_t[order[:k1]].sum().item()
                top_mass[1] += gain_t[order[:k10]].sum().item()
                top = order[:k10]
                for name, out in outs.items():
                    err = (full - out).square().sum((0, 1, 2, 4))
                    err0 = (full - base).square().sum((0, 1, 2, 4))
                    row = totals.setdefault(name, [0.0] * 5)
                    row[0] += (g * (out - base)).sum().item() / len(windows)
                    row[1] += err.sum().item()
                    row[2] += err0.sum().item()
                    row[3] += err[top].sum().item()
                    row[4] += err0[top].sum().item()
        full_gain = totals["full"][0]
        for name, (d, err, err0, err_top, err0_top) in totals.items():
            print(
                f"| {layer} | {name} | {d:+.4f} | {d / full_gain:.1%} | {1 - err / err0:.1%} | "
                f"{1 - err_top / err0_top:.1%} |"
            )
        whole = full_gain * len(windows)
        print(
            f"| {layer} | evicted share of attention, gain-weighted / mean | "
            f"{where[0] / where[1]:.3f} / {where[2] / where[5]:.3f} | | | |"
        )
        print(
            f"| {layer} | top evicted key's share of the evicted mass, gain-weighted / mean | "
            f"{where[3] / where[1]:.3f} / {where[4] / where[5]:.3f} | | | |"
        )
        print(
            f"| {layer} | top 1% / 10% positions hold | {top_mass[0] / whole:.1%} / "
            f"{top_mass[1] / whole:.1%} of full's first-order gain | | | |"
        )


if __name__ == "__main__":
    main()
