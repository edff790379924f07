"""Why LESS helps teacher-forced scoring yet not summaries (issue #29, deliverable 2): the
reference summaries' NLL on the same few-shot prompts, through three forms of each method.

* ``teacher-forced``: prompt + summary scored in one pass (the parallel form, which the
  kernels are trained and evaluated in): eviction is progressive, one pair per token from the
  first token over the budget on;
* ``decoding``: what generation does: the prompt attended in full and compressed to the budget
  at once (the reference code's prefill), then the summary fed one token per step through the
  LessCache;
* ``chunked``: the same, with the prompt prefilled in chunks (``--prefill-chunk``), each
  compressed before the next: eviction in steps of a chunk.

Every form keeps the same number of pairs (the budget resolved once against the prompt). Per
method: mean NLL per summary token, and LESS minus Baseline+ paired per sample with its
standard error.

    OMP_NUM_THREADS=1 python docs/summary_nll_probe.py --samples 30 --json runs/summary_nll.json

With ``--json`` the scores are saved after every sample, and a rerun resumes after the last.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lesskv.core.budget import Budget
from lesskv.core.policies import make_policy
from lesskv.evaluation.generation import prefill_in_chunks
from lesskv.evaluation.summarization import fit_prompt, load_examples
from lesskv.hf.checkpoint import LessKernels
from lesskv.hf.compat import cache_argument
from lesskv.hf.loading import load_model
from lesskv.hf.methods import StepOptions, make_cache, using_method
from lesskv.hf.modules import max_context

METHODS = ("baseline", "baseline+", "less")
FORMS = ("teacher-forced", "decoding", "chunked")
EAGER = StepOptions(compile=False)


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean NLL of ``targets`` (T,) under ``logits`` (T, V)."""
    return F.cross_entropy(logits.float(), targets).item()


@torch.no_grad()
def through_cache(model, method, policy, kernels, prompt, summary, chunk: int | None) -> float:
    """The summary's NLL fed one token per step after the prompt's prefill (one call, or
    chunks of ``chunk`` tokens)."""
    cache = make_cache(model, method, policy, kernels, step=EAGER)
    rest = prompt
    if chunk is not None:
        prefill_in_chunks(model, prompt, cache, chunk)
        rest = prompt[:, -1:]
    logits = [model(input_ids=rest, **cache_argument(model, cache)).logits[0, -1:]]
    for t in range(summary.shape[1] - 1):
        step = model(input_ids=summary[:, t : t + 1], **cache_argument(model, cache))
        logits.append(step.logits[0, -1:])
    return nll(torch.cat(logits), summary[0])


@torch.no_grad()
def teacher_forced(model, method, policy, kernels, prompt, summary) -> float:
    ids = torch.cat([prompt, summary], 1)
    n = summary.shape[1]
    with using_method(model, method, policy=policy, kernels=kernels):
        logits = model(input_ids=ids).logits
    return nll(logits[0, -n - 1 : -1], summary[0])


def paired(a: list[float], b: list[float]) -> str:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    wins = sum(d < 0 for d in diffs)
    return f"{statistics.mean(diffs):+.4f} ± {se:.4f} (lower in {wins}/{len(diffs)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="xsum", help="xsum, cnn, multinews or a jsonl path")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--start", type=int, default=0, help="skip this many (split a run)")
    parser.add_argument("--policy", default="h2o")
    parser.add_argument("--budget", default="0.1")
    parser.add_argument("--kernels", default=None, help="default: the shipped set")
    parser.add_argument("--chunk", type=int, default=128, help="the chunked form's chunk")
    parser.add_argument("--summary-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    kernels = LessKernels.from_pretrained(
        args.kernels or f"smollm2-135m-{args.policy}-0.1", model, args.policy
    )
    budget = Budget.parse(args.budget)
    room = max_context(model) - args.summary_tokens
    examples = load_examples(args.data, args.start + args.samples, args.data_dir)[args.start :]
    scores: dict[str, list[float]] = {"full": []}
    scores |= {f"{m}/{f}": [] for m in METHODS for f in FORMS}
    prompt_tokens: list[int] = []
    if args.json and args.json.is_file():  # resume: the samples already scored are kept
        saved = json.loads(args.json.read_text())
        prompt_tokens, scores = saved.pop("prompt_tokens"), saved
    for example in tqdm(examples[len(prompt_tokens) :], desc="samples"):
        prompt = fit_prompt(tokenizer, example.prompt, room)
        summary = tokenizer(" " + example.reference.strip(), return_tensors="pt").input_ids
        summary = summary[:, : args.summary_tokens]
        # one budget for every form: resolved once, against the prompt (as generation does)
        policy = make_policy(args.policy, Budget(budget.tokens(prompt.shape[1])))
        prompt_tokens.append(prompt.shape[1])
        scores["full"].append(teacher_forced(model, "full", None, None, prompt, summary))
        for method in METHODS:
            kernel_arg = kernels if method == "less" else None
            scores[f"{method}/teacher-forced"].append(
                teacher_forced(model, method, policy, kernel_arg, prompt, summary)
            )
            for form, chunk in (("decoding", None), ("chunked", args.chunk)):
                scores[f"{method}/{form}"].append(
                    through_cache(model, method, policy, kernel_arg, prompt, summary, chunk)
                )
        if args.json:  # after every sample: an interrupted run resumes from here
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"prompt_tokens": prompt_tokens, **scores}, indent=2))
    n = len(examples)
    print(f"{n} samples, mean prompt {sum(prompt_tokens) / n:.0f} tokens, {args.policy} {budget}")
    print(f"full: {statistics.mean(scores['full']):.4f}")
    print("| form | baseline | baseline+ | less | less − baseline+ (paired, ± s.e.) |")
    print("|---|---|---|---|---|")
    for form in FORMS:
        means = [statistics.mean(scores[f"{m}/{form}"]) for m in METHODS]
        diff = paired(scores[f"less/{form}"], scores[f"baseline+/{form}"])
        print(f"| {form} | " + " | ".join(f"{v:.4f}" for v in means) + f" | {diff} |")


if __name__ == "__main__":
    main()
