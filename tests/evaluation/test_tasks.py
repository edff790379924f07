"""lm-eval adapter: exact loglikelihoods, padding-free batching, offline tasks end to end."""

import json
import random
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from helpers import BOS, WORDS, kernel_set, make_tiny_model, save_tiny, tiny_tokenizer
from lesskv.cli import main
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError
from lesskv.evaluation.tasks import LessLM, check_tasks, evaluate_tasks, local_tasks
from lesskv.hf.methods import using_method

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
METHODS = ["full", "baseline", "baseline+", "less"]


def requests(n: int, seed: int = 0, shortest: int = 3, longest: int = 60) -> list[Instance]:
    """Contexts of ``shortest``..``longest`` words with 1..4-word continuations (lengths differ, so
    batches are padded)."""
    rnd = random.Random(seed)
    words = WORDS[2:]
    out = []
    for i in range(n):
        context = " ".join(rnd.choices(words, k=rnd.randint(shortest, longest)))
        continuation = " " + " ".join(rnd.choices(words, k=rnd.randint(1, 4)))
        out.append(Instance("loglikelihood", {}, (context, continuation), i))
    return out


def direct_loglikelihood(model, tokenizer, context: str, continuation: str, prefix=()) -> float:
    ctx = [*prefix, *tokenizer.encode(context, add_special_tokens=False)]
    whole = [*prefix, *tokenizer.encode(context + continuation, add_special_tokens=False)]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = model(input_ids=ids[:, :-1]).logits[0].log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_full_loglikelihoods_equal_a_direct_computation_and_lm_evals_own_hf_model():
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = make_tiny_model("llama-gqa"), tiny_tokenizer()
    reqs = requests(10)
    lm = LessLM(model, tokenizer, "full", batch_size=4, progress=False)
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for req, (logprob, greedy) in zip(reqs, got, strict=True):
        assert logprob == pytest.approx(direct_loglikelihood(model, tokenizer, *req.args), abs=1e-4)
        assert isinstance(greedy, bool)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3)
    expected = reference.loglikelihood(reqs, disable_tqdm=True)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    assert [g for _, g in got] == [g for _, g in expected]


def test_a_bos_tokenizer_scores_every_request_after_bos_as_lm_evals_hf_model_does():
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = make_tiny_model("llama-gqa"), tiny_tokenizer(adds_bos=True)
    reqs = [*requests(6), Instance("loglikelihood", {}, ("", " the cat"), 6)]
    got = LessLM(model, tokenizer, "full", progress=False).loglikelihood(reqs, disable_tqdm=True)
    for req, (logprob, _) in zip(reqs, got, strict=True):
        direct = direct_loglikelihood(model, tokenizer, *req.args, prefix=[BOS])
        assert logprob == pytest.approx(direct, abs=1e-4)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3)
    expected = reference.loglikelihood(reqs, disable_tqdm=True)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)


@pytest.mark.parametrize("policy", ["h2o", "lambda"])
def test_batched_scores_equal_one_request_at_a_time_with_a_relative_budget(policy):
    """Batches are padded and share one resolved budget; each score must equal the request
    scored alone, where the fraction resolves against that request's own length."""
    model, tokenizer = make_tiny_model("llama-gqa"), tiny_tokenizer()
    pol = make_policy(policy, 0.25)
    layers = list(kernel_set(model, policy).layers)
    reqs = requests(6, seed=1, shortest=20, longest=32)  # Λ needs more than its 4 sinks
    for method in METHODS:
        lm = LessLM(model, tokenizer, method, pol, layers, rank=4, batch_size=3, progress=False)
        batched = [lp for lp, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
        with using_method(model, method, policy=pol, kernels=layers, rank=4):
            alone = [direct_loglikelihood(model, tokenizer, *r.args) for r in reqs]
        assert batched == pytest.approx(alone, abs=1e-4), method
    full = LessLM(model, tokenizer, "full", progress=False).loglikelihood(reqs, disable_tqdm=True)
    assert [lp for lp, _ in full] != pytest.approx(batched, abs=1e-4)  # eviction did bite


def test_request_sizes_follow_each_request():
    model, tokenizer = make_tiny_model("qwen2"), tiny_tokenizer()
    lm = LessLM(model, tokenizer, "baseline", make_policy("h2o", 0.5), progress=False)
    reqs = requests(4)
    for r in reqs:
        r.task_name = "t"
    lm.loglikelihood(reqs, disable_tqdm=True)
    lengths = [len(tokenizer.encode(c + x)) - 1 for c, x in (r.args for r in reqs)]
    assert lm.sizes["t"] == [(n, round(n / 2)) for n in lengths]


def test_bad_settings_fail_before_scoring():
    model, tokenizer = make_tiny_model("llama-mha"), tiny_tokenizer()
    with pytest.raises(LessKVError, match="kernels"):
        LessLM(model, tokenizer, "less", make_policy("h2o", 0.2))
    lm = LessLM(model, tokenizer, "baseline", make_policy("lambda", 0.1), progress=False)
    with pytest.raises(LessKVError, match="sinks"):  # 10% of a short request < 4 sinks
        lm.loglikelihood(requests(2), disable_tqdm=True)
    with pytest.raises(LessKVError, match="generation"):
        lm.generate_until([])
    with pytest.raises(LessKVError, match="eval ppl"):
        lm.loglikelihood_rolling([])


def write_piqa(root: Path) -> Path:
    """Four PIQA-layout examples in the tiny vocabulary: answer = the goal's last word."""
    rows = [("the cat sat on", "mat", "dog"), ("a dog ran on", "mat", "cat")] * 2
    (root / "piqa").mkdir(parents=True)
    with (root / "piqa" / "valid.jsonl").open("w") as f:
        for goal, right, wrong in rows:
            f.write(json.dumps({"goal": goal, "sol1": right, "sol2": wrong}) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("0\n0\n0\n0\n")
    return root


def test_a_local_task_runs_end_to_end(tmp_path):
    model, tokenizer = make_tiny_model("llama-gqa"), tiny_tokenizer()
    data = write_piqa(tmp_path / "data")
    rows = evaluate_tasks(
        model,
        tokenizer,
        ["piqa"],
        ["full", "baseline"],
        make_policy("h2o", 0.5),
        num_fewshot=2,
        data_dir=data,
        batch_size=3,
        progress=False,
    )
    assert [(r.task, r.method, r.samples, r.num_fewshot) for r in rows] == [
        ("piqa", "full", 4, 2),
        ("piqa", "baseline", 4, 2),
    ]
    assert all(0 <= r.acc <= 1 for r in rows)
    assert rows[0].mean_kept == rows[0].mean_tokens >= 20  # two 7-token shots + the question
    assert rows[1].mean_kept == pytest.approx(rows[1].mean_tokens / 2, abs=1)
    with pytest.raises(LessKVError, match="unknown task"):
        evaluate_tasks(model, tokenizer, ["hellaswag"], ["full"], data_dir=data)
    with pytest.raises(LessKVError, match="not found"):
        evaluate_tasks(model, tokenizer, ["rte"], ["full"], data_dir=data)


def test_more_shots_than_a_task_holds_or_an_unreachable_hub_is_one_line(tmp_path):
    model, tokenizer = make_tiny_model("llama-gqa"), tiny_tokenizer()
    data = write_piqa(tmp_path / "data")
    with pytest.raises(LessKVError, match="--num-fewshot 9 is more examples than a task's"):
        evaluate_tasks(
            model, tokenizer, ["piqa"], ["full"], num_fewshot=9, data_dir=data, progress=False
        )

    class Offline:
        all_tasks = ("piqa",)

        def load(self, names):
            raise ConnectionError(
                "Couldn't reach 'baber/piqa' on the Hub (LocalEntryNotFoundError)"
            )

    with pytest.raises(LessKVError, match=r"Hub \(LocalEntryNotFoundError\): go online, or pass"):
        check_tasks(Offline(), ["piqa"], local=False)


def test_generation_tasks_are_refused_before_any_scoring(tmp_path):
    from lm_eval.tasks import TaskManager

    data = write_piqa(tmp_path / "data")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gen.yaml").write_text(
        "task: gen\n"
        "custom_dataset: !function lesskv.evaluation.tasks.load_local\n"
        "dataset_kwargs: {splits: {validation: piqa/valid.jsonl}}\n"
        "validation_split: validation\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{goal}}'\n"
        "doc_to_target: '{{sol1}}'\n"
    )
    manager = TaskManager(
        include_path=str(tmp_path / "tasks"), include_defaults=False, metadata={"data_dir": data}
    )
    with pytest.raises(LessKVError, match="generate text"):
        check_tasks(manager, ["gen"], local=True)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the repo")
def test_cli_runs_every_shipped_task_on_the_shared_data(tmp_path, capsys):
    save_tiny(tmp_path / "model")
    out = tmp_path / "rows.json"
    tasks = ",".join(local_tasks())
    args = ["eval", "tasks", "--model", str(tmp_path / "model"), "--tasks", tasks]
    args += ["--data-dir", str(SHARED_DATA), "--limit", "2", "--num-fewshot", "1"]
    args += ["--methods", "full,baseline+", "--budget", "0.5", "--json", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in local_tasks() for m in ("full", "baseline+")
    }
    assert all(r["samples"] == 2 and 0 <= r["acc"] <= 1 for r in rows)
    assert "| task" in capsys.readouterr().out
    assert main([*args[:-2], "--methods", "full,less"]) == 2  # no kernels for a local model
    assert "kernels" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the repo")
def test_default_model_matches_lm_eval_and_runs_less_with_shipped_kernels():
    from lm_eval.models.huggingface import HFLM

    from lesskv.hf.checkpoint import resolve_kernels
    from lesskv.hf.loading import load_model

    model, tokenizer = load_model()
    reqs = [
        Instance("loglikelihood", {}, ("Question: How do I boil water?\nAnswer:", ans), i)
        for i, ans in enumerate([" Heat it in a pot.", " Put it in the freezer."])
    ]
    ours = LessLM(model, tokenizer, "full", progress=False).loglikelihood(reqs, disable_tqdm=True)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer).loglikelihood(reqs, disable_tqdm=True)
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-3)

    policy = make_policy("h2o", 0.1)
    kernels = list(resolve_kernels(None, "smollm2-135m", model, policy, 0).layers)
    rows = evaluate_tasks(
        model,
        tokenizer,
        ["piqa"],
        ["full", "less"],
        policy,
        kernels,
        num_fewshot=1,
        limit=2,
        data_dir=SHARED_DATA,
        progress=False,
    )
    assert [r.method for r in rows] == ["full", "less"]
    assert rows[1].mean_kept == pytest.approx(0.1 * rows[1].mean_tokens, abs=1)
