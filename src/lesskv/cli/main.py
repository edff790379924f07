"""The ``lesskv`` command: parses arguments and calls the library; errors print on one line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lesskv.errors import LessKVError
from lesskv.hf.compat import check_versions

if TYPE_CHECKING:  # the command imports the heavy modules only once it knows what it runs
    from lesskv.core.policies import Policy
    from lesskv.training.distributed import Worker

DESCRIPTION = """\
lesskv: LESS (Dong et al., ICML 2024) for Hugging Face models. A sparse KV-cache policy
(H2O, Λ-shaped attention sinks) keeps a small budget of key/value pairs per head; LESS adds
a tiny learned low-rank state that absorbs every evicted pair, so no past token is forgotten.

Methods compared everywhere:
  full       the model's own attention over every past token
  baseline   the sparse policy alone, keeping BUDGET pairs per KV head
  baseline+  the policy with extra pairs weighing as much as LESS's state (fair comparison)
  less       the policy plus the learned low-rank state (needs kernels)

Examples:
  lesskv demo
  lesskv eval ppl --data wiki.test.raw --seq-len 1024 --windows 12 --policy h2o --budget 0.1 \\
      --methods full,baseline,baseline+,less
  lesskv train --policy h2o --budget 0.1 --data c4.jsonl --sequences 64 --out runs/h2o-0.1
  lesskv finetune --policy h2o --budget 0.1 --data c4.jsonl --sequences 32 --out runs/h2o-ft
  lesskv generate --method less --budget 0.1 --prompt "Once upon a time"
  lesskv eval tasks --tasks piqa,arc_easy --data-dir ../shared/data --num-fewshot 5 --limit 100
  lesskv analyze residual --budget 0.1 --out figs/
  lesskv bench --contexts 1024,8000 --batch-sizes 1,8 --methods full,baseline,less
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="built-in 'smollm2-135m' (default), a Hugging Face id or a local directory",
    )


def _add_policy_args(p: argparse.ArgumentParser, budget: str | None = None) -> None:
    p.add_argument("--policy", default="h2o", help="sparse policy: h2o (default) or lambda")
    p.add_argument(
        "--budget",
        default=budget,
        required=budget is None,
        help="KV pairs kept per head: a token count (>= 1) or a fraction of the sequence "
        "(0.1 or 10%%)",
    )


def _add_data_args(p: argparse.ArgumentParser, default: str | None = "builtin") -> None:
    p.add_argument(
        "--data",
        default=default,
        help="'builtin' (Python's documentation text), a .txt/.raw/.jsonl file, or "
        "hf:NAME[/CONFIG][:SPLIT] (online)",
    )
    p.add_argument("--field", default=None, help="jsonl/dataset field holding the text")


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _add_kernels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kernels",
        type=Path,
        default=None,
        help="trained kernel folder for LESS (default model: the shipped kernels)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesskv", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="full vs H2O vs Λ perplexity on the built-in model and text, explained"
    )
    demo.add_argument("--windows", type=int, default=4, help="1024-token windows to score")
    demo.set_defaults(run=_run_demo)

    evaluate = commands.add_parser("eval", help="quality evaluations").add_subparsers(
        dest="evaluation", required=True, metavar="EVALUATION"
    )
    ppl = evaluate.add_parser(
        "ppl",
        help="token-level perplexity per method over the same windows",
        description="Perplexity of full / baseline / baseline+ / less on non-overlapping "
        "windows of --seq-len tokens; every method sees the same windows.",
    )
    _add_model_args(ppl)
    _add_data_args(ppl, default=None)
    ppl.add_argument("--seq-len", type=int, default=1024, help="window length in tokens")
    ppl.add_argument("--windows", type=int, default=None, help="score only the first N windows")
    _add_policy_args(ppl)
    ppl.add_argument(
        "--methods",
        default="full,baseline,baseline+",
        help="comma-separated: " + ", ".join(["full", "baseline", "baseline+", "less"]),
    )
    _add_kernels_arg(ppl)
    ppl.add_argument(
        "--transfer",
        action="store_true",
        help="accept --kernels trained for another policy (transfer studies; budgets always "
        "transfer)",
    )
    ppl.add_argument("--rank", type=int, default=8, help="LESS rank R (sizes Baseline+)")
    ppl.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ppl.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    ppl.set_defaults(run=_run_eval_ppl)

    summ = evaluate.add_parser(
        "summarize",
        help="ROUGE-1/2/L of generated summaries per method (real eviction)",
        description="Generate summaries with each method's cache and score them with ROUGE. "
        "Budgets are relative to each prompt.",
    )
    _add_model_args(summ)
    summ.add_argument(
        "--data",
        default="xsum",
        help="xsum (H2O's 5-shot prompts), cnn, multinews (LongBench), or a jsonl path",
    )
    summ.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder holding xsum_h2o/, cnn_dailymail/, longbench/ "
        "(default $LESSKV_DATA_DIR or ../shared/data)",
    )
    summ.add_argument("--samples", type=int, default=10)
    _add_policy_args(summ, budget="0.1")
    summ.add_argument("--methods", default="full,baseline,baseline+,less")
    _add_kernels_arg(summ)
    summ.add_argument("--rank", type=int, default=8)
    summ.add_argument("--max-new-tokens", type=int, default=64)
    summ.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    summ.set_defaults(run=_run_eval_summarize)

    tasks = evaluate.add_parser(
        "tasks",
        help="accuracy on lm-eval tasks per method (piqa, rte, arc_easy, ...; few-shot)",
        description="Score lm-evaluation-harness tasks (loglikelihood / multiple choice) with "
        "every method on the same prompts. Budgets are relative to each request's length, so "
        "few-shot prompts are compressed by the same ratio as short ones. Task names are "
        "lm-eval's (online); --data-dir reads local copies of piqa, rte, openbookqa, arc_easy, "
        "arc_challenge and winogrande instead.",
    )
    _add_model_args(tasks)
    tasks.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    tasks.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="offline: folder laid out like ../shared/data (piqa/, rte/, arc/, ...)",
    )
    tasks.add_argument("--num-fewshot", type=int, default=None, help="examples per prompt")
    tasks.add_argument("--limit", type=int, default=None, help="score only N documents per task")
    _add_policy_args(tasks, budget="0.1")
    tasks.add_argument("--methods", default="full,baseline,baseline+,less")
    _add_kernels_arg(tasks)
    tasks.add_argument("--rank", type=int, default=8, help="LESS rank R (sizes Baseline+)")
    tasks.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    tasks.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    tasks.set_defaults(run=_run_eval_tasks)

    analyze = commands.add_parser(
        "analyze", help="figures: residual spectrum (paper Fig. 3), attention maps (Fig. 1)"
    ).add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    residual = analyze.add_parser(
        "residual",
        help="singular-value energy of attention outputs vs the full-minus-sparse residual",
        description="Per layer and head, the share of energy in the top-1/2/4/8/16 singular "
        "values of the attention output and of the residual (full - sparse) at positions where "
        "the policy has evicted, averaged over --windows windows. Writes residual.png and "
        "residual.json to --out.",
    )
    _add_model_args(residual)
    _add_data_args(residual)
    _add_policy_args(residual, budget="0.1")
    residual.add_argument("--seq-len", type=int, default=512, help="window length in tokens")
    residual.add_argument("--windows", type=int, default=2, help="windows averaged")
    residual.add_argument("--out", type=Path, required=True, help="output folder")
    residual.set_defaults(run=_run_analyze_residual)
    attention = analyze.add_parser(
        "attention",
        help="attention maps of full, sparse and LESS-effective attention for one head",
        description="For one text, layer and query head: the full attention map, the sparse "
        "policy's map, and LESS's effective map (kept keys by softmax weight, evicted keys by "
        "phi(q).psi(k)). Writes attention.png and attention.json to --out.",
    )
    _add_model_args(attention)
    _add_data_args(attention)
    attention.add_argument("--text", default=None, help="the text (instead of --data)")
    _add_policy_args(attention, budget="0.1")
    attention.add_argument("--seq-len", type=int, default=256, help="tokens of the text used")
    attention.add_argument("--layer", type=int, default=0)
    attention.add_argument("--head", type=int, default=0, help="query head")
    _add_kernels_arg(attention)
    attention.add_argument("--out", type=Path, required=True, help="output folder")
    attention.set_defaults(run=_run_analyze_attention)

    gen = commands.add_parser(
        "generate",
        help="stream a continuation with real eviction (baseline) or LESS",
        description="Generate text with a cache that really evicts: --method baseline keeps "
        "--budget pairs per KV head; --method less adds the learned state (--kernels DIR, or the "
        "shipped kernels of the default model); --method full is transformers' own cache.",
    )
    _add_model_args(gen)
    gen.add_argument("--method", choices=["full", "baseline", "less"], default="less")
    gen.add_argument("--policy", default="h2o", help="sparse policy: h2o (default) or lambda")
    gen.add_argument(
        "--budget",
        default="0.1",
        help="pairs kept per KV head: tokens, or a fraction of the prompt (default 0.1)",
    )
    _add_kernels_arg(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--file", type=Path, help="read the prompt from this file")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="process the prompt in chunks of N tokens (bounded memory for long prompts)",
    )
    gen.set_defaults(run=_run_generate)

    bench = commands.add_parser(
        "bench",
        help="decode speed and cache memory: full vs baseline vs less, per context and batch",
        description="Prefill a batch of real-text prompts of each --contexts length, then time "
        "--new-tokens greedy decoding steps one by one, for every method and batch size. "
        "Prints a Markdown table and how many sequences fit --memory-budget-gib of cache.",
    )
    _add_model_args(bench)
    _add_policy_args(bench, budget="0.1")
    _add_kernels_arg(bench)
    bench.add_argument(
        "--contexts", default="1024,2048,4096,8000", help="comma-separated prompt lengths"
    )
    bench.add_argument("--batch-sizes", default="1,4,8", help="comma-separated batch sizes")
    bench.add_argument("--methods", default="full,baseline,less", help="full, baseline, less")
    bench.add_argument("--new-tokens", type=int, default=64, help="decoding steps timed")
    bench.add_argument(
        "--shared-prefill",
        action="store_true",
        help="prefill one prompt per grid point and repeat its cache across the batch "
        "(decode timings unchanged; makes long-context batches affordable on CPU)",
    )
    bench.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    _add_data_args(bench)
    bench.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    bench.add_argument("--plot", type=Path, default=None, help="write a PNG of the results")
    bench.add_argument(
        "--memory-budget-gib",
        type=float,
        default=4.0,
        help="cache memory for the max-batch comparison (default 4 GiB)",
    )
    bench.set_defaults(run=_run_bench)

    train = commands.add_parser(
        "train",
        help="train LESS kernels for a model, policy and budget",
        description="Record the frozen model's attention on --data, then fit each layer's "
        "kernels to what eviction loses. Reruns resume; --layers splits work across processes, "
        "and `torchrun --nproc-per-node N -m lesskv train ...` splits the layers across N "
        "processes (GPUs, or CPU processes without CUDA) and across nodes.",
    )
    _add_model_args(train)
    _add_policy_args(train)
    _add_data_args(train, default=None)
    train.add_argument("--sequences", type=int, default=64, help="training windows")
    train.add_argument("--seq-len", type=int, default=1024, help="window length in tokens")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=2)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--rank", type=int, default=8, help="LESS rank R")
    train.add_argument("--hidden", type=int, default=128, help="kernel MLP hidden size")
    train.add_argument("--layers", default=None, help="train only layers a:b (resumable)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, required=True, help="output kernel folder")
    train.add_argument(
        "--overwrite", action="store_true", help="replace another run's kernels in --out"
    )
    train.add_argument(
        "--distributed",
        action="store_true",
        help="split the layers across torchrun's processes (implied when torchrun starts more "
        "than one); --out must be shared by all of them",
    )
    train.set_defaults(run=_run_train)

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune trained kernels end to end on the next-token loss",
        description="Start from per-layer kernels (`lesskv train`, or the shipped ones for "
        "--policy/--budget) and train every layer's kernels at once, the model frozen, to "
        "minimise KL(full model || LESS model) of the next-token distributions on --data. "
        "The kernels with the best validation KL are written to --out (the starting ones "
        "count); an interrupted run resumes from its last step.",
    )
    _add_model_args(finetune)
    _add_kernels_arg(finetune)
    _add_policy_args(finetune, budget="0.1")
    _add_data_args(finetune, default=None)
    finetune.add_argument("--sequences", type=int, default=32, help="training windows")
    finetune.add_argument(
        "--val-sequences", type=int, default=4, help="validation windows (after the training ones)"
    )
    finetune.add_argument("--seq-len", type=int, default=1024, help="window length in tokens")
    finetune.add_argument("--epochs", type=int, default=1)
    finetune.add_argument("--lr", type=float, default=1e-3)
    finetune.add_argument(
        "--val-every", type=int, default=16, help="steps between validations (and at the end)"
    )
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", type=Path, required=True, help="output kernel folder")
    finetune.add_argument(
        "--overwrite", action="store_true", help="replace another run's kernels in --out"
    )
    finetune.set_defaults(run=_run_finetune)
    return parser


def _print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """A Markdown table: readable in a terminal and pasteable into docs."""

    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")


def _parse_methods(text: str) -> list[str]:
    from lesskv.hf.methods import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise LessKVError(
            f"unknown method(s) {unknown or text!r}: choose from {', '.join(METHODS)}"
        )
    return methods


def _run_eval_ppl(args: argparse.Namespace) -> None:
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts, token_windows
    from lesskv.evaluation.perplexity import evaluate_perplexity
    from lesskv.hf.loading import load_model

    if args.data is None:
        raise LessKVError("--data is required (builtin, a file path, or hf:NAME)")
    methods = _parse_methods(args.methods)
    policy = make_policy(args.policy, args.budget)
    policy.slots(args.seq_len)  # validates the budget against the window before any loading
    if args.windows is not None and args.windows < 1:
        raise LessKVError(f"--windows must be >= 1, got {args.windows}")
    texts = load_texts(args.data, field=args.field)
    model, tokenizer = load_model(args.model)
    check_seq_len(args.seq_len, args.model, model)
    kernels = None
    if "less" in methods:
        kernels = resolve_kernels(
            args.kernels, args.model, model, policy, args.seq_len, transfer=args.transfer
        )
    windows = token_windows(tokenizer, texts, args.seq_len, max_windows=args.windows)
    results = evaluate_perplexity(
        model,
        windows,
        methods,
        policy=policy,
        kernels=kernels,
        rank=args.rank,
        batch_size=args.batch_size,
    )
    rows = [r.as_dict() for r in results]
    _print_table(rows, ["method", "policy", "budget_tokens", "ppl", "nll", "tokens"])
    if args.json is not None:
        _write_json(args.json, rows)


def _run_eval_summarize(args: argparse.Namespace) -> None:
    from lesskv.core.policies import make_policy
    from lesskv.evaluation.summarization import as_rows, evaluate_summarization, load_examples
    from lesskv.hf.checkpoint import LessKernels, shipped_kernels
    from lesskv.hf.loading import load_model

    methods = _parse_methods(args.methods)
    policy = make_policy(args.policy, args.budget)
    if args.samples < 1:
        raise LessKVError("--samples must be >= 1")
    examples = load_examples(args.data, args.samples, args.data_dir)
    model, tokenizer = load_model(args.model)
    kernels = None
    if "less" in methods:
        path = args.kernels or shipped_kernels(args.model, policy)
        kernels = LessKernels.from_pretrained(path, model, policy=policy.name)
    results, generations = evaluate_summarization(
        model, tokenizer, examples, methods, policy, kernels, args.rank, args.max_new_tokens
    )
    rows = as_rows(results)
    _print_table(rows, ["method", "policy", "budget", "rouge1", "rouge2", "rougeL", "samples"])
    if args.json is not None:
        _write_json(args.json, {"rows": rows, "generations": generations})


def _run_eval_tasks(args: argparse.Namespace) -> None:
    from lesskv.core.policies import make_policy
    from lesskv.evaluation.tasks import evaluate_tasks, quiet_lm_eval
    from lesskv.hf.loading import load_model

    methods = _parse_methods(args.methods)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    policy = make_policy(args.policy, args.budget)
    quiet_lm_eval()
    model, tokenizer = load_model(args.model)
    kernels = None
    if "less" in methods:
        kernels = resolve_kernels(args.kernels, args.model, model, policy, 0)
    results = evaluate_tasks(
        model,
        tokenizer,
        tasks,
        methods,
        policy=policy,
        kernels=kernels,
        rank=args.rank,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
    )
    rows = [r.as_dict() for r in results]
    columns = "task method policy budget num_fewshot acc acc_norm samples mean_tokens mean_kept"
    _print_table(rows, columns.split())
    if args.json is not None:
        _write_json(args.json, rows)


def _run_analyze_residual(args: argparse.Namespace) -> None:
    from lesskv.analysis.figures import plot_residual_energy, residual_energy
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts, token_windows
    from lesskv.hf.loading import load_model

    policy = make_policy(args.policy, args.budget)
    policy.slots(args.seq_len)
    if args.windows < 1:
        raise LessKVError(f"--windows must be >= 1, got {args.windows}")
    texts = load_texts(args.data, field=args.field)
    model, tokenizer = load_model(args.model)
    check_seq_len(args.seq_len, args.model, model)
    windows = token_windows(tokenizer, texts, args.seq_len, max_windows=args.windows)
    report = residual_energy(model, windows, policy, model_name=args.model)
    json_path, png_path = report.save(args.out), plot_residual_energy(report, args.out)
    _print_table(report.layer_rows(), ["layer", *report.columns()])
    print(f"written: {png_path}, {json_path}")


def _run_analyze_attention(args: argparse.Namespace) -> None:
    from lesskv.analysis.figures import attention_maps, plot_attention_maps
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts, token_windows
    from lesskv.hf.loading import load_model

    policy = make_policy(args.policy, args.budget)
    model, tokenizer = load_model(args.model)
    check_seq_len(args.seq_len, args.model, model)
    if args.text is not None:
        ids = tokenizer(args.text, return_tensors="pt").input_ids[:, : args.seq_len]
    else:
        texts = load_texts(args.data, field=args.field)
        ids = token_windows(tokenizer, texts, args.seq_len, max_windows=1)
    kernels = None
    try:
        kernels = resolve_kernels(args.kernels, args.model, model, policy, ids.shape[1])
    except LessKVError as err:
        if args.kernels is not None:
            raise
        print(f"no LESS map: {err}", file=sys.stderr)
    maps = attention_maps(model, ids, args.layer, args.head, policy, kernels)
    maps.tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    json_path, png_path = maps.save(args.out), plot_attention_maps(maps, args.out)
    _print_table(maps.summary_rows(), ["map", "tv_to_full", "mass_on_evicted"])
    print(f"written: {png_path}, {json_path}")


def _run_bench(args: argparse.Namespace) -> None:
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts
    from lesskv.evaluation.bench import (
        BENCH_METHODS,
        check_contexts,
        max_batch_for_memory,
        parse_int_list,
        plot_benchmark,
        run_benchmark,
    )
    from lesskv.hf.checkpoint import LessKernels, shipped_kernels
    from lesskv.hf.loading import load_model

    contexts = parse_int_list(args.contexts, "--contexts", 2)
    batch_sizes = parse_int_list(args.batch_sizes, "--batch-sizes", 1)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if not methods or unknown:
        raise LessKVError(
            f"unknown method(s) {unknown or args.methods!r}: bench runs {', '.join(BENCH_METHODS)}"
        )
    if args.new_tokens < 1:
        raise LessKVError("--new-tokens must be >= 1")
    if args.memory_budget_gib <= 0:
        raise LessKVError("--memory-budget-gib must be > 0")
    policy = make_policy(args.policy, args.budget)
    for context in contexts:
        policy.slots(context)  # validates the budget before any loading
    texts = load_texts(args.data, field=args.field)
    model, tokenizer = load_model(args.model, device=args.device)
    check_contexts(model, contexts, args.new_tokens)
    kernels = None
    if "less" in methods:
        path = args.kernels or shipped_kernels(args.model, policy)
        kernels = LessKernels.from_pretrained(path, model, policy=policy.name).to(model.device)
    rows = run_benchmark(
        model,
        tokenizer,
        contexts=contexts,
        batch_sizes=batch_sizes,
        methods=methods,
        policy=policy,
        kernels=kernels,
        new_tokens=args.new_tokens,
        prompt_texts=texts,
        shared_prefill=args.shared_prefill,
    )
    dicts = [r.as_dict() for r in rows]
    shown = [
        {
            **d,
            "cache_MiB": d["cache_bytes"] / 2**20,
            "peak_rss_MiB": (d["peak_rss_bytes"] or 0) / 2**20,
        }
        for d in dicts
    ]
    print(
        f"{args.model} on {rows[0].device}, {policy.name} budget {policy.budget}, "
        f"{args.new_tokens} decoding steps timed one by one"
    )
    _print_table(
        shown,
        [
            "method",
            "context",
            "batch",
            "budget_tokens",
            "prefill_s",
            "decode_ms_per_token",
            "decode_ms_p90",
            "decode_tokens_per_s",
            "cache_MiB",
            "peak_rss_MiB",
        ],
    )
    if args.json is not None:
        _write_json(args.json, dicts)
    if args.plot is not None:
        print(f"plot written to {plot_benchmark(rows, args.plot)}")
    budget_bytes = int(args.memory_budget_gib * 2**30)
    context = max(contexts)
    fits = [
        max_batch_for_memory(
            model,
            context,
            budget_bytes,
            method,
            policy,
            kernels.meta.rank if kernels is not None else None,
            new_tokens=args.new_tokens,
        )
        for method in methods
    ]
    print(
        f"\nSequences whose cache fits {args.memory_budget_gib:g} GiB at context {context} "
        f"(+{args.new_tokens} new tokens; K/V and LESS state only, weights excluded):"
    )
    _print_table(
        [{**f, "MiB_per_sequence": f["bytes_per_sequence"] / 2**20} for f in fits],
        ["method", "context", "tokens_held", "MiB_per_sequence", "max_batch"],
    )


def _check_training_args(args: argparse.Namespace, *counts: str) -> None:
    """Training needs data, and each of ``counts`` (argument names) must be at least 1."""
    if args.data is None:
        raise LessKVError("--data is required (a file path, builtin, or hf:NAME)")
    for name in counts:
        if getattr(args, name) < 1:
            raise LessKVError(f"--{name.replace('_', '-')} must be >= 1")


def _run_train(args: argparse.Namespace) -> None:
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts
    from lesskv.training import distributed

    _check_training_args(args, "sequences", "epochs", "batch_size", "rank", "hidden")
    policy = make_policy(args.policy, args.budget)
    policy.slots(args.seq_len)
    texts = load_texts(args.data, field=args.field)
    if args.distributed or distributed.launched_by_torchrun():
        with distributed.process_group() as worker:
            _train(args, policy, texts, worker)
    else:
        _train(args, policy, texts, None)


def _train(
    args: argparse.Namespace, policy: Policy, texts: list[str], worker: Worker | None
) -> None:
    """Load, train, report; ``worker`` is this process's place in a torchrun job, if any."""
    from lesskv.data import token_windows
    from lesskv.hf.loading import load_model
    from lesskv.training import distributed
    from lesskv.training.per_layer import TrainConfig, parse_layers, train_kernels

    model, tokenizer = load_model(args.model, device=None if worker is None else str(worker.device))
    check_seq_len(args.seq_len, args.model, model)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    windows = token_windows(tokenizer, texts, args.seq_len, max_windows=args.sequences)
    config = TrainConfig(
        model=args.model,
        policy=policy.name,
        budget=str(policy.budget),
        seq_len=args.seq_len,
        sequences=len(windows),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        rank=args.rank,
        hidden=args.hidden,
        seed=args.seed,
        data=args.data,
    )
    options = {"layers": layers, "overwrite": args.overwrite, "command": args.command_line}
    if worker is None:
        kernels = train_kernels(model, windows, policy, config, args.out, **options)
    else:
        kernels = distributed.train_kernels(
            worker, model, windows, policy, config, args.out, **options
        )
        if worker.rank != 0:
            return
    if kernels is None:
        print(
            f"layers {args.layers} done; rerun without --layers (or finish the others) "
            f"to assemble {args.out}"
        )
    else:
        from lesskv.analysis.plots import plot_layer_losses

        figure = plot_layer_losses(kernels.meta, args.out / "val_loss.png")
        print(f"kernels written to {args.out}; per-layer losses plotted in {figure}")


def _run_finetune(args: argparse.Namespace) -> None:
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts, token_windows
    from lesskv.hf.checkpoint import LessKernels, shipped_kernels
    from lesskv.hf.loading import load_model
    from lesskv.training.finetune import FinetuneConfig, finetune_kernels

    _check_training_args(args, "sequences", "val_sequences", "epochs", "val_every")
    model, tokenizer = load_model(args.model)
    check_seq_len(args.seq_len, args.model, model)
    base = args.kernels or shipped_kernels(args.model, make_policy(args.policy, args.budget))
    kernels = LessKernels.from_pretrained(base, model)
    wanted = args.sequences + args.val_sequences
    texts = load_texts(args.data, field=args.field)
    windows = token_windows(tokenizer, texts, args.seq_len, max_windows=wanted)
    if len(windows) < 2:
        raise LessKVError(f"--data holds {len(windows)} window(s) of {args.seq_len} tokens; need 2")
    n_val = min(args.val_sequences, len(windows) // 2)
    config = FinetuneConfig(
        model=args.model,
        base_kernels=str(base),
        data=args.data,
        seq_len=args.seq_len,
        sequences=len(windows) - n_val,
        val_sequences=n_val,
        epochs=args.epochs,
        lr=args.lr,
        val_every=args.val_every,
        seed=args.seed,
    )
    train, val = windows[:-n_val], windows[-n_val:]
    tuned = finetune_kernels(
        model, kernels, train, val, config, args.out, args.overwrite, args.command_line
    )
    info = tuned.meta.finetune
    print(
        f"validation KL {info['val_kl_before']:.4f} -> {info['val_kl_after']:.4f} "
        f"(best at step {info['best_step']}); kernels written to {args.out}"
    )


def _run_generate(args: argparse.Namespace) -> None:
    from lesskv.core.policies import make_policy
    from lesskv.evaluation.generation import generate_text
    from lesskv.hf.cache import LessCache
    from lesskv.hf.checkpoint import LessKernels, shipped_kernels
    from lesskv.hf.loading import load_model

    if args.file is not None:
        try:
            prompt = args.file.read_text()
        except OSError as err:
            raise LessKVError(f"cannot read prompt file {args.file}: {err.strerror}") from None
    else:
        prompt = args.prompt
    if args.max_new_tokens < 1:
        raise LessKVError("--max-new-tokens must be >= 1")
    policy = make_policy(args.policy, args.budget)
    model, tokenizer = load_model(args.model)
    cache = None
    if args.method == "baseline":
        cache = LessCache(model, policy)
    elif args.method == "less":
        path = args.kernels or shipped_kernels(args.model, policy)
        kernels = LessKernels.from_pretrained(path, model, policy=policy.name)
        cache = LessCache(model, policy, kernels=kernels)
    options = {"do_sample": args.sample}
    if args.sample:
        options["temperature"] = args.temperature
    generate_text(
        model,
        tokenizer,
        prompt,
        cache,
        args.max_new_tokens,
        args.prefill_chunk,
        stream=True,
        **options,
    )
    if cache is not None:
        memory = cache.memory_bytes()
        print(
            f"\n[{args.method}: cache holds {memory['kv'] / 2**20:.2f} MiB of K/V"
            f" + {memory['state'] / 2**10:.1f} KiB of LESS state]",
            file=sys.stderr,
        )


def check_seq_len(seq_len: int, model_name: str, model) -> None:
    from lesskv.hf.modules import max_context

    if seq_len > max_context(model):
        raise LessKVError(
            f"--seq-len {seq_len} exceeds {model_name}'s context of {max_context(model)} tokens"
        )


def resolve_kernels(path, model_name, model, policy, seq_len, transfer: bool = False):
    """Kernels from ``path``, or the shipped ones for the default model and this policy;
    ``transfer`` skips the policy check (the model is always checked)."""
    from lesskv.hf.checkpoint import LessKernels, shipped_kernels

    if path is None:
        path = shipped_kernels(model_name, policy)
    checked = None if transfer else policy.name
    kernels = LessKernels.from_pretrained(path, model, policy=checked)
    kernels.warn_if_far_beyond_training_length(seq_len)
    return list(kernels.layers)


def _run_demo(args: argparse.Namespace) -> None:
    from lesskv.core.budget import DEFAULT_MODEL
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts, token_windows
    from lesskv.evaluation.generation import generate_text
    from lesskv.evaluation.perplexity import evaluate_perplexity
    from lesskv.hf.cache import LessCache
    from lesskv.hf.checkpoint import LessKernels, available, shipped_kernels
    from lesskv.hf.loading import load_model

    print(f"Loading {DEFAULT_MODEL} (the first run converts and caches the weights)...")
    model, tokenizer = load_model(DEFAULT_MODEL)
    windows = token_windows(tokenizer, load_texts("builtin"), 1024, max_windows=args.windows)
    rows = evaluate_perplexity(model, windows, ["full"])
    shipped = {}
    for name in ("h2o", "lambda"):
        policy = make_policy(name, 0.1)
        methods = ["baseline", "baseline+"]
        if f"{DEFAULT_MODEL}-{name}-0.1" in available():
            shipped[name] = LessKernels.from_pretrained(
                shipped_kernels(DEFAULT_MODEL, policy), model, policy=name
            )
            methods.append("less")
        layers = list(shipped[name].layers) if name in shipped else None
        rows += evaluate_perplexity(model, windows, methods, policy=policy, kernels=layers)
    print(f"\nPerplexity on {len(windows)} windows of 1024 tokens of Python's documentation:")
    _print_table([r.as_dict() for r in rows], ["method", "policy", "budget_tokens", "ppl"])
    print(
        "\nfull: every past token is attended (the reference, lowest perplexity).\n"
        "baseline h2o: each KV head keeps 102 pairs (10%): the 51 most recent tokens plus the\n"
        "  51 that received the most attention so far; the rest is evicted for good.\n"
        "baseline lambda: each KV head keeps 4 'attention sink' tokens plus the 98 most recent.\n"
        "baseline+: the same policy with 4 more pairs per head, as much memory as LESS's state.\n"
        "less: the policy plus the learned rank-8 state that absorbs every evicted pair, so\n"
        "  evicted tokens still count. Lower perplexity than baseline+ at equal memory is the\n"
        "  point of LESS."
    )
    if "h2o" in shipped:
        prompt = load_texts("builtin")[0][:1500]
        print("\nGreedy continuation with real eviction (H2O 10% of the prompt) + LESS state:")
        cache = LessCache(model, make_policy("h2o", 0.1), kernels=shipped["h2o"])
        text = generate_text(model, tokenizer, prompt, cache, max_new_tokens=40)
        memory = cache.memory_bytes()
        print(f"  ...{prompt[-200:]!r}\n  -> {text!r}")
        print(
            f"  cache: {memory['kv'] / 2**20:.2f} MiB of K/V + {memory['state'] / 2**10:.0f} KiB "
            f"of LESS state for {cache.get_seq_length()} tokens seen"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["lesskv", *argv])  # recorded in the checkpoints written
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_versions()  # before any model is loaded
        for warning in caught:
            print(f"lesskv: warning: {warning.message}", file=sys.stderr)
        args.run(args)
    except LessKVError as err:
        print(f"lesskv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lesskv: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
