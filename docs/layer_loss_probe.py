"""One layer's kernels, trained with different losses (`lesskv train --layers L:L+1 --loss ...`),
side by side on held-out WikiText windows, on the model's real inputs: the share of the plain
policy's error ||O_full - O_sparse||^2 each removes (beside Baseline+ and the rank-8 oracle) and
the KL between the true attention weights and LESS's implied ones.

    python docs/layer_loss_probe.py --layer 23 --runs runs/loss-mse-l23 runs/loss-kl-l23 ...
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from lesskv.analysis.layers import _squared_errors
from lesskv.core import math
from lesskv.core.distribution import attention_kl
from lesskv.core.kernels import LayerKernels
from lesskv.core.policies import make_policy
from lesskv.data import load_texts, token_windows
from lesskv.hf.checkpoint import LessKernels
from lesskv.hf.loading import load_model
from lesskv.hf.methods import get_method, observing
from lesskv.hf.modules import attention_scale


def trained_layer(run: Path, layer: int, like: LayerKernels) -> LayerKernels:
    """The layer's kernels from a `lesskv train --layers` folder (its per-layer checkpoint), at
    the hidden width and rank they were trained with."""
    state = load_file(run / "layers" / f"layer_{layer:03d}.safetensors")
    _, hidden, rank = state["phi_mlp.w2"].shape
    kernels = LayerKernels(replace(like.shape, hidden=hidden, rank=rank)).eval()
    kernels.load_state_dict(state)
    return kernels


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    policy = make_policy("h2o", 0.1)
    shipped = LessKernels.from_pretrained("smollm2-135m-h2o-0.1", model, "h2o")
    like = shipped.layers[args.layer]
    candidates = {"shipped": like} | {
        run.name: trained_layer(run, args.layer, like) for run in args.runs
    }
    windows = token_windows(tokenizer, load_texts(args.data), 1024, max_windows=args.windows)
    totals = {name: {"error": 0.0, "kl": 0.0} for name in candidates}
    reference = {"baseline": 0.0, "baseline+": 0.0, "oracle": 0.0}

    def observe(module, query, key, value) -> None:
        scale, q = attention_scale(module), math.group_queries(query, key.shape[1])
        t = key.shape[2]
        logits = math.causal_logits(q, key, scale)
        steps = policy.eviction_steps(logits, policy.slots(t), t).expand(*key.shape[:2], t)
        for name, kernels in candidates.items():
            setups = {
                m: get_method(m).layer_setup(policy, module, kernels, 8)
                for m in ("baseline", "baseline+", "less")
            }
            errors = _squared_errors(module, query, key, value, setups, 8)
            totals[name]["error"] += errors["less"]
            phi, psi = kernels.phi(q), kernels.psi(key)
            kl = attention_kl(q, key, steps, phi, psi, kernels.decay_rate(), scale, start=102)
            totals[name]["kl"] += kl.item() / len(windows)
        for name in reference:
            reference[name] += errors[name]

    with observing(model, observe, layers=[args.layer]):
        for window in windows:
            model(window[None])
    sparse = reference["baseline"]
    print(f"layer {args.layer}, {len(windows)} WikiText windows, H2O 10%")
    for name in ("baseline+", "oracle"):
        print(f"  {name:>10}: removes {1 - reference[name] / sparse:6.1%} of the sparse error")
    for name, total in totals.items():
        removed = 1 - total["error"] / sparse
        print(f"  {name:>10}: removes {removed:6.1%} of the sparse error, KL {total['kl']:.4f}")


if __name__ == "__main__":
    main()
