"""Task accuracy per method through EleutherAI's lm-evaluation-harness (lm-eval 0.4.x).

lm-eval turns every multiple-choice task into loglikelihood requests ``(context,
continuation)``; :class:`LessLM` scores them teacher-forced through the one attention path of
:mod:`lesskv.hf.methods`, so full / baseline / baseline+ / less answer exactly the same
prompts. A fractional budget resolves against each request's own length (the whole scored
sequence, context + continuation, as ``set_method`` resolves it for one unpadded sequence), so
a 16-shot prompt and a 0-shot prompt are compressed by the same ratio and the few-shot examples
are what gets evicted.

Online, task names are lm-eval's standard tasks. With ``data_dir`` the same names resolve to
the configs in ``task_configs/``, which read local copies of the data (no network).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from itertools import groupby
from pathlib import Path

import datasets
import lm_eval
import pyarrow.parquet as pq
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lesskv.core.budget import DEFAULT_RANK, Budget
from lesskv.core.policies import Policy
from lesskv.data import bos_prefix
from lesskv.errors import LessKVError, one_line
from lesskv.evaluation.perplexity import kept_tokens
from lesskv.hf.methods import get_method, set_method
from lesskv.hf.modules import attention_modules, max_context

TASK_CONFIGS = Path(__file__).parent / "task_configs"
SCORED_TYPES = ("multiple_choice", "loglikelihood")


def local_tasks() -> list[str]:
    """Task names that ``data_dir`` can serve (one shipped YAML each)."""
    return sorted(p.stem for p in TASK_CONFIGS.glob("*.yaml"))


def load_local(
    data_dir: str | None = None,
    splits: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    **_task_metadata: object,
) -> datasets.DatasetDict:
    """lm-eval's ``custom_dataset`` hook for the shipped configs: each split from a file under
    ``data_dir`` (``.jsonl`` records or ``.parquet``), plus an optional one-label-per-line
    file (PIQA keeps its labels apart). lm-eval also passes the task's metadata; unused."""
    if data_dir is None:
        raise LessKVError("local lm-eval tasks need a data folder (--data-dir DIR)")
    root = Path(data_dir)
    dataset = {}
    for split, name in (splits or {}).items():
        records = _read_records(root / name)
        if labels and split in labels:
            values = [int(v) for v in _read_lines(root / labels[split])]
            if len(values) != len(records):
                raise LessKVError(
                    f"{root / labels[split]} has {len(values)} labels for {len(records)} records"
                )
            records = [{**r, "label": v} for r, v in zip(records, values, strict=True)]
        dataset[split] = datasets.Dataset.from_list(records)
    return datasets.DatasetDict(dataset)


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise LessKVError(
            f"task data {path} not found: --data-dir must hold the layout of ../shared/data "
            "(see each folder's SOURCE.txt)"
        )
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in _read_lines(path)]


def _read_lines(path: Path) -> list[str]:
    with path.open() as f:
        return [line for line in f if line.strip()]


class LessLM(TemplateLM):
    """An lm-eval model: one lesskv-enabled Hugging Face model under one method.

    Requests are grouped by their resolved budget (every member of a batch keeps the same
    number of pairs per head) and right-padded within the group, which leaves each real
    token's keep-set, and so its score, as it would be at batch size 1.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        method: str = "full",
        policy: Policy | None = None,
        kernels: Sequence[nn.Module] | None = None,
        rank: int = DEFAULT_RANK,
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise LessKVError(f"batch size must be >= 1, got {batch_size}")
        # Fails here, not mid-run, on a bad method / policy / kernel combination.
        set_method(model, method, policy=policy, kernels=kernels, rank=rank)
        set_method(model, "full")
        self.model, self.tokenizer = model, tokenizer
        self.bos = bos_prefix(tokenizer)  # what starts every context: the tokenizer's convention
        # lm-eval's LM.rank is the process rank; LESS's rank lives in state_rank.
        self.method, self.policy, self.kernels, self.state_rank = method, policy, kernels, rank
        self.batch_size, self.progress = batch_size, progress
        self.head_dim = attention_modules(model)[0].head_dim
        # Per lm-eval task: (tokens scored, pairs kept per KV head) of every request.
        self.sizes: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self._last_sizes: list[tuple[int, int]] = []

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return max_context(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """The string's tokens after BOS where the tokenizer adds one (:func:`bos_prefix`), as
        lm-eval's own HF model encodes them: not when lm-eval asks for no special tokens (a
        continuation) nor twice when the string already starts with BOS."""
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        if add_special_tokens is False or ids[: len(self.bos)] == self.bos:
            return ids
        return self.bos + ids

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        for request, sizes in zip(requests, self._last_sizes, strict=True):
            self.sizes[request.task_name].append(sizes)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        raise LessKVError("perplexity tasks: use 'lesskv eval ppl' (same windows for every method)")

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise LessKVError(
            "eval tasks scores loglikelihood (multiple-choice) tasks in the parallel form; "
            "for generation with real eviction use 'lesskv eval summarize'"
        )

    def _allowed(self, seq_len: int) -> int:
        """Pairs the policy's budget allows a ``seq_len``-token request (0: full attention)."""
        return self.policy.budget.tokens(seq_len) if get_method(self.method).sparse else 0

    def _resolved(self, tokens: int, seq_len: int) -> Policy | None:
        """The policy with its budget fixed at ``tokens`` pairs (None: full attention), checked
        against a ``seq_len``-token request that resolves to it."""
        if not tokens:
            return None
        policy = replace(self.policy, budget=Budget(tokens))
        try:
            policy.slots(seq_len)
        except LessKVError as err:
            raise LessKVError(
                f"budget {self.policy.budget} leaves a {seq_len}-token request {tokens} pairs: "
                f"{err}"
            ) from None
        return policy

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """``(logprob, is_greedy)`` of each continuation, truncating contexts from the left
        to the model's context as lm-eval's own HF model does."""
        inputs = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1) :]
            inputs.append((whole[:-1], whole[-len(continuation) :]))
        allowed = [self._allowed(len(ids)) for ids, _ in inputs]
        policies: dict[int, Policy | None] = {}
        for tokens, (ids, _) in zip(allowed, inputs, strict=True):
            if tokens not in policies:  # every budget is checked before any forward pass
                policies[tokens] = self._resolved(tokens, len(ids))
        method, head_dim, rank = self.method, self.head_dim, self.state_rank
        self._last_sizes = [
            (len(ids), kept_tokens(method, policies[tokens], len(ids), head_dim, rank))
            for tokens, (ids, _) in zip(allowed, inputs, strict=True)
        ]
        order = sorted(range(len(inputs)), key=lambda i: (allowed[i], -len(inputs[i][0])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
        bar = tqdm(
            total=len(inputs),
            desc=f"loglikelihood ({self.method})",
            unit="req",
            disable=disable_tqdm or not self.progress,
        )
        try:
            for tokens, members in groupby(order, key=allowed.__getitem__):
                members = list(members)
                set_method(
                    self.model, method, policy=policies[tokens], kernels=self.kernels, rank=rank
                )
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    scores = self._score([inputs[i] for i in batch])
                    for i, result in zip(batch, scores, strict=True):
                        results[i] = result
                    bar.update(len(batch))
        finally:
            bar.close()
            set_method(self.model, "full")
        return results

    @torch.no_grad()
    def _score(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One right-padded forward pass; padding only ever follows a row's real tokens.

        Only the positions that predict continuations get logits: projecting every position
        onto the vocabulary would hold B x T x V floats (260 MB for 8 few-shot prompts on
        SmolLM2) to read a few of them."""
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (tokens, _) in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        padded = bool((mask == 0).any())
        first = min(len(tokens) - len(target) for tokens, target in batch)
        logits = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device) if padded else None,
            logits_to_keep=width - first,
        ).logits
        results = []
        for row, (tokens, target) in enumerate(batch):
            end = len(tokens) - first
            logprobs = logits[row, end - len(target) : end].float().log_softmax(-1)
            target_ids = torch.tensor(target, device=logprobs.device)
            logprob = logprobs.gather(-1, target_ids[:, None]).sum().item()
            greedy = bool((logprobs.argmax(-1) == target_ids).all())
            results.append((logprob, greedy))
        return results


@dataclass
class TaskResult:
    """One table row. ``mean_tokens``: scored tokens per request; ``mean_kept``: pairs each KV
    head keeps for them (budgets follow each request's length)."""

    task: str
    method: str
    policy: str
    budget: str
    num_fewshot: int
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    samples: int
    mean_tokens: float
    mean_kept: float

    def as_dict(self) -> dict:
        return asdict(self)


def task_manager(data_dir: Path | None):
    """lm-eval's registry: the standard tasks, or only the shipped local configs."""
    if data_dir is None:
        return TaskManager()
    if not Path(data_dir).is_dir():
        raise LessKVError(f"--data-dir {data_dir} is not a folder")
    return TaskManager(
        include_path=str(TASK_CONFIGS),
        include_defaults=False,
        metadata={"data_dir": str(Path(data_dir).resolve())},
    )


def check_tasks(manager, tasks: Sequence[str], local: bool) -> None:
    """Unknown names and generation / perplexity tasks fail before any model work."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = (
            f"local tasks are {', '.join(local_tasks())} (drop --data-dir for lm-eval's own)"
            if local
            else "see 'lm-eval ls tasks'"
        )
        raise LessKVError(f"unknown task(s) {', '.join(unknown)}: {where}")
    try:
        loaded = manager.load(list(tasks))["tasks"]
    except ConnectionError as err:  # the tasks' data is on the Hub, and the Hub out of reach
        raise LessKVError(
            f"{one_line(err, 120)}: go online, or pass --data-dir with the tasks' data"
        ) from None
    other = [n for n, t in loaded.items() if t.OUTPUT_TYPE not in SCORED_TYPES]
    if other:
        raise LessKVError(
            f"task(s) {', '.join(other)} generate text or score perplexity; eval tasks scores "
            "multiple-choice / loglikelihood tasks (see eval summarize, eval ppl)"
        )


def evaluate_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    methods: Sequence[str],
    policy: Policy | None = None,
    kernels: Sequence[nn.Module] | None = None,
    rank: int = DEFAULT_RANK,
    num_fewshot: int | None = None,
    limit: int | None = None,
    data_dir: Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[TaskResult]:
    """Accuracy of every task under every method, on the same documents and prompts (lm-eval's
    fixed seeds pick the same few-shot examples each time); the model ends in full mode."""
    if not tasks:
        raise LessKVError("no tasks given")
    if limit is not None and limit < 1:
        raise LessKVError(f"--limit must be >= 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise LessKVError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    manager = task_manager(data_dir)
    check_tasks(manager, tasks, local=data_dir is not None)
    rows = []
    for method in methods:
        lm = LessLM(model, tokenizer, method, policy, kernels, rank, batch_size, progress)
        out = _evaluate(lm, tasks, num_fewshot, limit, manager)
        for name, metrics in out["results"].items():
            if "acc,none" not in metrics:
                continue  # a group's aggregate row, or a task without accuracy
            sizes = lm.sizes[name]
            rows.append(
                TaskResult(
                    task=name,
                    method=method,
                    **get_method(method).labels(policy),
                    num_fewshot=int(out["n-shot"].get(name, 0)),
                    acc=float(metrics["acc,none"]),
                    acc_stderr=_number(metrics.get("acc_stderr,none")),
                    acc_norm=_number(metrics.get("acc_norm,none")),
                    samples=int(out["n-samples"][name]["effective"]),
                    mean_tokens=sum(n for n, _ in sizes) / max(1, len(sizes)),
                    mean_kept=sum(k for _, k in sizes) / max(1, len(sizes)),
                )
            )
    return rows


def _evaluate(
    lm: TemplateLM,
    tasks: Sequence[str],
    num_fewshot: int | None,
    limit: int | None,
    manager: TaskManager,
) -> dict:
    """lm-eval's results; more few-shot examples than a task has is one LessKVError."""
    try:
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,
        )
    except ValueError as err:  # random.sample's, drawing the few-shot examples
        if "Sample larger than population" not in str(err):
            raise
        raise LessKVError(
            f"--num-fewshot {num_fewshot} is more examples than a task's few-shot split holds"
        ) from None


def _number(value: object) -> float | None:
    """lm-eval writes ``"N/A"`` where it has no standard error."""
    return float(value) if isinstance(value, (int, float)) else None


def quiet_lm_eval() -> None:
    """lm-eval warns on every local task load (custom datasets, few-shot overrides)."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
