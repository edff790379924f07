import json

import pytest

from helpers import BOS, kernel_set, make_tiny_model, tiny_tokenizer
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError
from lesskv.evaluation.summarization import evaluate_summarization, load_examples

TEXT = "the cat sat on a mat the dog ran " * 6


def write_examples(path, n=2):
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"article": TEXT, "summary_gt": "the cat sat"}) + "\n")
    return str(path)


def test_every_method_generates_and_is_scored(tmp_path):
    model = make_tiny_model("llama-gqa")
    examples = load_examples(write_examples(tmp_path / "s.jsonl"), samples=2)
    methods = ["full", "baseline", "baseline+", "less"]
    rows, generations = evaluate_summarization(
        model,
        tiny_tokenizer(),
        examples,
        methods,
        make_policy("h2o", 0.25),
        kernels=kernel_set(model),
        rank=4,
        max_new_tokens=5,
        progress=False,
    )
    assert [r.method for r in rows] == methods
    assert all(0 <= r.rouge1 <= 100 and r.samples == 2 for r in rows)
    assert len(generations) == 8


@pytest.mark.parametrize("adds_bos", [False, True])
def test_full_method_is_plain_greedy_generation(tmp_path, adds_bos):
    """From the prompt as the tokenizer encodes it: after BOS where it adds one."""
    model = make_tiny_model("llama-mha")
    tokenizer = tiny_tokenizer(adds_bos)
    examples = load_examples(write_examples(tmp_path / "s.jsonl", 1), samples=1)
    rows, generations = evaluate_summarization(
        model,
        tokenizer,
        examples,
        ["full"],
        make_policy("h2o", 8),
        max_new_tokens=4,
        progress=False,
    )
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert (ids[0, 0] == BOS) == adds_bos and rows[0].mean_prompt_tokens == ids.shape[1]
    plain = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    expected = tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert generations[0]["summary"] == expected


def test_more_new_tokens_than_the_context_holds_is_refused(tmp_path):
    """The prompt is cut to the room left: none left used to end in a reshape error."""
    model = make_tiny_model("llama-gqa")
    examples = load_examples(write_examples(tmp_path / "s.jsonl", n=1), samples=1)
    with pytest.raises(LessKVError, match="exceed the model's context of 256"):
        evaluate_summarization(
            model, tiny_tokenizer(), examples, ["full"], make_policy("h2o", 8), max_new_tokens=256
        )


def test_record_formats_and_errors(tmp_path):
    cnn = tmp_path / "cnn.jsonl"
    cnn.write_text(json.dumps({"article": "a", "highlights": "b"}) + "\n")
    assert load_examples(str(cnn), 5)[0].reference == "b"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(LessKVError, match="article"):
        load_examples(str(bad), 1)
    with pytest.raises(LessKVError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"), 1)
    with pytest.raises(LessKVError, match="--data-dir"):
        load_examples("xsum", 1, data_dir=tmp_path)


@pytest.mark.parametrize("name", ["xsum", "cnn", "multinews"])
def test_shared_data_files_parse(name):
    from pathlib import Path

    data_dir = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not data_dir.is_dir():
        pytest.skip("../shared/data is not beside the repository")
    examples = load_examples(name, 2, data_dir)
    assert len(examples) == 2 and all(e.prompt and e.reference for e in examples)
