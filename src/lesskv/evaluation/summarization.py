"""Summarization with real eviction: ROUGE of full / baseline / baseline+ / LESS generations.

Each method generates from the same prompts through one cache object (transformers' dynamic
cache for full, :class:`~lesskv.hf.cache.LessCache` otherwise); budgets are relative to each
prompt, so every article is compressed by the same ratio.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lesskv.core.budget import DEFAULT_RANK
from lesskv.core.policies import Policy
from lesskv.errors import LessKVError
from lesskv.hf.checkpoint import LessKernels
from lesskv.hf.compat import cache_argument
from lesskv.hf.methods import PLAIN_STEPS, StepOptions, get_method, make_cache
from lesskv.hf.modules import check_fits, max_context

# Named datasets: file under the data folder, and how to turn a record into (prompt, summary).
NAMED = {
    "xsum": "xsum_h2o/xsum_5shot_h2o.jsonl",
    "cnn": "cnn_dailymail/cnn_dm_validation_mlperf_sample.jsonl",
    "multinews": "longbench/multi_news.jsonl",
}
MULTINEWS_PROMPT = (
    "You are given several news passages. Write a one-page summary of all news. \n\n"
    "News:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"
)


@dataclass
class SummaryExample:
    prompt: str
    reference: str


@dataclass
class SummaryResult:
    method: str
    policy: str
    budget: str
    rouge1: float
    rouge2: float
    rougeL: float
    samples: int
    mean_prompt_tokens: float


def default_data_dir() -> Path:
    """``$LESSKV_DATA_DIR``, else a ``shared/data`` folder next to or above the working dir."""
    if "LESSKV_DATA_DIR" in os.environ:
        return Path(os.environ["LESSKV_DATA_DIR"])
    for candidate in (Path("shared/data"), Path("../shared/data")):
        if candidate.is_dir():
            return candidate
    return Path("data")


def to_example(record: dict) -> SummaryExample:
    """H2O format (article + summary_gt), CNN/DM (article + highlights), LongBench."""
    if "summary_gt" in record:
        return SummaryExample(record["article"], record["summary_gt"])
    if "highlights" in record:
        prompt = (
            f"###\nArticle: {record['article']}\n\nSummarize the above article in 3 sentences.\n"
        )
        return SummaryExample(prompt, record["highlights"])
    if "context" in record and "answers" in record:
        answers = record["answers"]
        reference = answers[0] if isinstance(answers, list) else str(answers)
        context = record["context"].replace("NEWLINE_CHAR", "\n")
        return SummaryExample(MULTINEWS_PROMPT.format(context=context), reference)
    raise LessKVError(
        f"a summarization record needs article+summary_gt, article+highlights or "
        f"context+answers; this one has {', '.join(sorted(record))}"
    )


def load_examples(source: str, samples: int | None, data_dir: Path | None = None) -> list:
    """Examples from a named dataset (xsum, cnn, multinews) or a jsonl path."""
    path = Path(source)
    if source in NAMED:
        path = (data_dir or default_data_dir()) / NAMED[source]
        if not path.is_file():
            raise LessKVError(
                f"{source} data not found at {path}: pass --data-dir (the folder holding "
                f"{NAMED[source].split('/')[0]}/) or a jsonl path"
            )
    elif not path.is_file():
        raise LessKVError(
            f"summarization data {source!r}: no such file (or use xsum/cnn/multinews)"
        )
    examples = []
    with path.open() as f:
        for line in f:
            if line.strip():
                examples.append(to_example(json.loads(line)))
            if samples is not None and len(examples) >= samples:
                break
    if not examples:
        raise LessKVError(f"{path} holds no examples")
    return examples


def fit_prompt(tokenizer, prompt: str, room: int) -> torch.Tensor:
    """Token ids, cut in the middle (LongBench's way) when longer than ``room``."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] > room:
        half = room // 2
        ids = torch.cat([ids[:, :half], ids[:, -(room - half) :]], 1)
    return ids


@torch.no_grad()
def evaluate_summarization(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[SummaryExample],
    methods: Sequence[str],
    policy: Policy,
    kernels: LessKernels | None = None,
    rank: int = DEFAULT_RANK,
    max_new_tokens: int = 64,
    progress: bool = True,
    step: StepOptions = PLAIN_STEPS,
) -> tuple[list[SummaryResult], list[dict]]:
    """ROUGE per method, plus every generation (for inspection); ``step``: how the caches
    run their decoding steps."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    check_fits(model, max_new_tokens + 1, f"{max_new_tokens} new tokens after a 1-token prompt")
    room = max_context(model) - max_new_tokens
    prompts = [fit_prompt(tokenizer, ex.prompt, room).to(model.device) for ex in examples]
    results, generations = [], []
    bar = tqdm(total=len(methods) * len(examples), desc="summarizing", disable=not progress)
    for method in methods:
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for example, ids in zip(examples, prompts, strict=True):
            output = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **cache_argument(model, make_cache(model, method, policy, kernels, rank, step)),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
            summary = text.split("###")[0].strip()
            scores = scorer.score(example.reference, summary)
            for name in totals:
                totals[name] += scores[name].fmeasure
            generations.append(
                {"method": method, "summary": summary, "reference": example.reference}
            )
            bar.update()
        n = len(examples)
        results.append(
            SummaryResult(
                method=method,
                **get_method(method).labels(policy),
                samples=n,
                mean_prompt_tokens=sum(p.shape[1] for p in prompts) / n,
                **{k: 100 * v / n for k, v in totals.items()},
            )
        )
    bar.close()
    return results, generations


def as_rows(results: Sequence[SummaryResult]) -> list[dict]:
    return [asdict(r) for r in results]
