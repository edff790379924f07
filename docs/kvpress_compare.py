"""lesskv's methods beside kvpress 0.5.5's presses: same model, same inputs, same budget.

    PY=$(bash docs/kvpress_env.sh | tail -1)   # a venv with kvpress 0.5.5 + transformers 5.2
    OMP_NUM_THREADS=2 $PY docs/kvpress_compare.py --out runs/kvpress.json

The protocol is kvpress's: the context is compressed **once, at prefill**, to 10% of its
tokens per KV head, and what follows (a question, a continuation) attends to the compressed
cache without further compression. lesskv's methods run the same protocol: the context is one
prefill call into a LessCache (full attention, then eviction to the budget; the evicted pairs
go into LESS's state or the merge slots), and what follows is one more call, then greedy
steps. lesskv's own evaluations evict at every step instead (docs/RESULTS.md §1), which is
harder; numbers from the two protocols are not comparable with each other.

(a) Needle retrieval: a passphrase sentence planted at 10/50/90% depth of 1024/2048/4096
    tokens of a PG-19 book, the user's question after the context (chat template), the answer
    primed with "The secret passphrase is", 8 greedy tokens, exact match.
(b) Continuation perplexity: the next 512 tokens after a 4096-token context of each PG-19
    book, teacher-forced in one call against the compressed cache.

kvpress's CAM press compresses only while decoding (a DecodingPress in 0.5.5), so under a
prefill budget it never runs; it is left out and the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from lesskv import LessKernels, cache_argument, load_model, make_cache, make_policy
from lesskv.errors import LessKVError
from lesskv.hf.checkpoint import shipped_kernels

BUDGET = 0.1
BOOKS = ("10146", "10321")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pg19"
LESSKV_METHODS = [
    (policy, method)
    for policy, methods in (
        ("h2o", ("baseline", "baseline+", "merge", "less")),
        ("lambda", ("baseline", "baseline+", "merge", "less")),
        ("tova", ("baseline", "baseline+", "merge")),
    )
    for method in methods
]
WORDS = ["amber", "falcon", "meadow", "copper", "lantern", "harbor", "violet", "thistle", "orbit"]


def kvpress_presses() -> dict[str, object]:
    try:
        import kvpress
    except ImportError:
        raise SystemExit(
            "kvpress is not installed here: run `bash docs/kvpress_env.sh` and use the python "
            "it prints (kvpress 0.5.5 needs transformers < 5.3)"
        ) from None
    ratio = 1 - BUDGET
    return {
        "kvpress StreamingLLM": kvpress.StreamingLLMPress(compression_ratio=ratio),
        "kvpress SnapKV": kvpress.SnapKVPress(compression_ratio=ratio),
        "kvpress TOVA": kvpress.TOVAPress(compression_ratio=ratio),
        "kvpress KNorm": kvpress.KnormPress(compression_ratio=ratio),
    }


# A runner prefills ``context`` ``(1, C)`` then feeds ``rest`` ``(1, R)`` in one call and
# returns (logits of the context's last position, logits of ``rest``, a step function).
Runner = Callable[[torch.Tensor, torch.Tensor], tuple]


def kvpress_runner(model, press) -> Runner:
    def run(context, rest):
        cache = DynamicCache()
        with torch.no_grad():
            with press(model):
                first = model(input_ids=context, past_key_values=cache).logits[:, -1]
            position = [context.shape[1]]

            def step(ids):
                positions = torch.arange(position[0], position[0] + ids.shape[1])[None]
                position[0] += ids.shape[1]
                out = model(input_ids=ids, past_key_values=cache, position_ids=positions)
                return out.logits

            return first, step(rest), step

    return run


def lesskv_runner(model, policy_name, method, kernels) -> Runner:
    def run(context, rest):
        policy = make_policy(policy_name, BUDGET)
        cache = make_cache(model, method, policy, kernels if method == "less" else None)
        argument = cache_argument(model, cache or DynamicCache())  # full: transformers' own
        with torch.no_grad():
            first = model(input_ids=context, **argument).logits[:, -1]

            def step(ids):
                return model(input_ids=ids, **argument).logits

            return first, step(rest), step

    return run


def needle_trials(tokenizer, book_ids: list[int], seed: int = 0) -> list[dict]:
    """3 lengths x 3 depths; each trial has its own passphrase."""
    rng = random.Random(seed)
    template = tokenizer.apply_chat_template(
        [{"role": "user", "content": "\x00"}], tokenize=False, add_generation_prompt=True
    )
    head, tail = template.split("\x00")
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    trials = []
    for length in (1024, 2048, 4096):
        for depth in (0.1, 0.5, 0.9):
            secret = f"{rng.choice(WORDS)}-{rng.randrange(1000, 10000)}"
            needle = tokenizer(
                f" The secret passphrase is {secret}. Remember it. ", add_special_tokens=False
            )["input_ids"]
            hay = book_ids[: length - len(head_ids) - len(needle)]
            cut = int(depth * len(hay))
            context = head_ids + hay[:cut] + needle + hay[cut:]
            question = (
                "\n\nWhat is the secret passphrase in the text above?"
                + tail
                + "The secret passphrase is"
            )
            question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
            trials.append(
                dict(
                    length=length,
                    depth=depth,
                    secret=secret,
                    context=context,
                    question=question_ids,
                )
            )
    return trials


def answer(run: Runner, trial: dict, tokenizer, new_tokens: int = 8) -> str:
    _, logits, step = run(torch.tensor([trial["context"]]), torch.tensor([trial["question"]]))
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(new_tokens - 1):
        tokens.append(int(step(torch.tensor([[tokens[-1]]]))[0, -1].argmax()))
    return tokenizer.decode(tokens, skip_special_tokens=True)


def continuation_nll(run: Runner, ids: list[int], context: int, rest: int) -> float:
    """Mean NLL of the ``rest`` tokens after ``context`` tokens (the first one predicted by
    the context's last position)."""
    tokens = torch.tensor([ids[: context + rest]])
    first, logits, _ = run(tokens[:, :context], tokens[:, context:])
    predicted = torch.cat([first[:, None], logits[:, :-1]], 1).float()
    return F.cross_entropy(predicted[0], tokens[0, context:]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/kvpress.json"))
    parser.add_argument("--quick", action="store_true", help="one trial per task (smoke test)")
    parser.add_argument(
        "--only", default=None, help="comma-separated method names (rows) to run, e.g. to finish"
    )
    args = parser.parse_args()
    presses = kvpress_presses()
    plain, tokenizer = load_model("smollm2-135m")  # kvpress hooks this one (sdpa attention)
    ours, _ = load_model("smollm2-135m")  # lesskv's attention runs this one
    kernels = {
        name: LessKernels.from_pretrained(
            shipped_kernels("smollm2-135m", make_policy(name, BUDGET)), ours
        )
        for name in ("h2o", "lambda")
    }
    runners: dict[str, Runner] = {"full": lesskv_runner(plain, "h2o", "full", None)}
    runners |= {name: kvpress_runner(plain, press) for name, press in presses.items()}
    for policy, method in LESSKV_METHODS:
        runners[f"lesskv {policy} {method}"] = lesskv_runner(
            ours, policy, method, kernels.get(policy)
        )
    if args.only is not None:
        wanted = [name.strip() for name in args.only.split(",")]
        unknown = sorted(set(wanted) - set(runners))
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}: choose from {sorted(runners)}")
        runners = {name: runners[name] for name in wanted}
    books = {
        b: tokenizer((DATA / f"{b}.txt").read_text(), add_special_tokens=False)["input_ids"]
        for b in BOOKS
    }
    trials = needle_trials(tokenizer, books[BOOKS[0]])
    if args.quick:
        trials = trials[4:5]
    rows = []
    for name, run in runners.items():
        hits = []
        for trial in trials:
            try:
                text = answer(run, trial, tokenizer)
            except LessKVError as err:
                raise SystemExit(f"{name}: {err}") from None
            hits.append(trial["secret"] in text)
            print(f"{name:28s} needle {trial['length']}@{trial['depth']:.0%}: {text!r}", flush=True)
        ppl = {}
        for book in BOOKS[: 1 if args.quick else None]:
            nll = continuation_nll(run, books[book], 1024 if args.quick else 4096, 512)
            ppl[book] = math.exp(nll)
        row = {"method": name, "needle": sum(hits) / len(hits), "needle_hits": hits}
        row |= {f"ppl_{b}": p for b, p in ppl.items()}
        print(json.dumps({k: v for k, v in row.items() if k != "needle_hits"}), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    columns = ["method", "needle"] + [f"ppl_{b}" for b in BOOKS if f"ppl_{b}" in rows[0]]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        cells = [row["method"], f"{row['needle']:.0%}"] + [f"{row[c]:.3f}" for c in columns[2:]]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
