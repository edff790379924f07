"""Commands run end to end on a tiny local model: eval ppl, kernels for another policy,
finetune, and the demo's generated text."""

import json
import sys

import pytest
import torch

from helpers import WORDS, kernel_set, make_tiny_model, save_tiny, tiny_tokenizer
from lesskv.cli import main
from lesskv.cli.demo import _show_generation
from lesskv.core.budget import Budget
from lesskv.hf.cache import LessCache


def _text_file(tmp_path):
    (tmp_path / "t.txt").write_text(" ".join("abcdefgh"[i % 8] for i in range(3000)))
    return str(tmp_path / "t.txt")


def test_eval_ppl_on_a_local_model(capsys, tmp_path):
    save_tiny(tmp_path / "model")
    torch.manual_seed(0)
    common = ["eval", "ppl", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    too_long = [*common, "--seq-len", "100000", "--budget", "8"]
    assert main(too_long) == 2
    err = capsys.readouterr().err
    assert "--seq-len windows (100000 tokens) exceed the model's context of 256" in err
    out_json = tmp_path / "rows.json"
    args = [*common, "--seq-len", "32", "--windows", "2", "--budget", "8", "--json", str(out_json)]
    assert main(args) == 0
    rows = json.loads(out_json.read_text())
    assert [r["method"] for r in rows] == ["full", "baseline", "baseline+"]
    assert {"method", "policy", "budget_tokens", "ppl", "nll", "tokens"} <= rows[0].keys()
    assert rows[1]["budget_tokens"] == 8 and rows[0]["tokens"] == 2 * 31
    assert "| method" in capsys.readouterr().out
    half = [*args[:-1], str(tmp_path / "bf16.json"), "--dtype", "bfloat16", "--methods", "merge"]
    assert main(half) == 0
    (merge,) = json.loads((tmp_path / "bf16.json").read_text())
    assert merge["head_bytes"] == 8 * 2 * 16 * 2 + 4 * 33 * 4  # bf16 pairs, 4 fp32 slots (R = 8)


def test_kernels_for_another_policy_need_transfer(capsys, tmp_path):
    model = save_tiny(tmp_path / "model")
    kernel_set(model, policy="lambda").save_pretrained(tmp_path / "kernels")
    args = ["eval", "ppl", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    args += ["--seq-len", "32", "--windows", "1", "--policy", "h2o", "--budget", "8"]
    args += ["--methods", "less", "--kernels", str(tmp_path / "kernels")]
    assert main(args) == 2
    assert "trained for policy 'lambda'" in capsys.readouterr().err
    assert main([*args, "--transfer"]) == 0
    assert "shipped" not in capsys.readouterr().err  # --kernels given: nothing to announce


def test_finetune_writes_kernels_and_reports_the_validation_kl(capsys, tmp_path):
    model = save_tiny(tmp_path / "model")
    kernel_set(model).save_pretrained(tmp_path / "kernels")
    args = ["finetune", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    args += ["--kernels", str(tmp_path / "kernels"), "--seq-len", "32", "--sequences", "2"]
    args += ["--val-sequences", "1", "--out", str(tmp_path / "tuned")]
    assert main(args) == 0
    assert "validation KL" in capsys.readouterr().out
    config = json.loads((tmp_path / "tuned" / "lesskv_kernels.json").read_text())
    assert config["finetune"]["steps"] == 2 and "lesskv finetune" in config["command"]
    assert config["finetune"]["base_kernels"] == str(tmp_path / "kernels")
    assert main([*args[:-2], "--sequences", "0", "--out", str(tmp_path / "x")]) == 2


def test_finetune_holds_out_windows_of_every_length(capsys, tmp_path):
    model = save_tiny(tmp_path / "model")
    kernel_set(model).save_pretrained(tmp_path / "kernels")
    args = ["finetune", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    args += ["--kernels", str(tmp_path / "kernels"), "--seq-len", "32,64", "--sequences", "4"]
    args += ["--val-sequences", "2", "--out", str(tmp_path / "tuned")]
    assert main(args) == 0
    run = json.loads((tmp_path / "tuned" / "run.json").read_text())
    assert run["seq_lens"] == [32, 64] and run["sequences"] == 6 and run["val_sequences"] == 3


def test_demo_prints_the_continuation_as_indented_text(capsys):
    model = make_tiny_model()
    prompt = " ".join(WORDS[2:] * 12)
    _show_generation(model, tiny_tokenizer(), kernel_set(model), prompt)
    lines = capsys.readouterr().out.splitlines()
    heading = lines.index("  the model continues:")
    continuation = lines[heading + 1]
    assert continuation.startswith("    ") and continuation.strip()
    assert not continuation.strip().startswith(("'", '"'))  # text, not a Python repr
    assert lines[heading - 1] == "    ..." + prompt[-200:]
    assert lines[-1].startswith("  cache:")


def test_train_a_second_round_on_sparse_upstream_inputs(capsys, tmp_path):
    model = save_tiny(tmp_path / "model")
    kernel_set(model).save_pretrained(tmp_path / "first")
    args = ["train", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    args += ["--budget", "8", "--seq-len", "32,64", "--sequences", "4", "--epochs", "1"]
    args += ["--rank", "4", "--hidden", "16", "--kernel", "paper"]
    args += ["--upstream", str(tmp_path / "first"), "--out", str(tmp_path / "second")]
    assert main(args) == 0
    config = json.loads((tmp_path / "second" / "lesskv_kernels.json").read_text())
    assert config["state"] == "paper" and config["seq_len"] == 64
    assert "--upstream" in config["command"]
    run = json.loads((tmp_path / "second" / "run.json").read_text())
    assert run["upstream"] == str(tmp_path / "first") and run["seq_lens"] == [32, 64]
    lambda_kernels = [*args[:-4], "--policy", "lambda", "--upstream", str(tmp_path / "first")]
    assert main([*lambda_kernels, "--out", str(tmp_path / "third")]) == 2
    assert "trained for policy 'h2o'" in capsys.readouterr().err


def test_train_on_several_sources_records_them_all(tmp_path):
    """`--data A B`: a file and a folder of books share the windows; the run records both,
    and the selection knobs."""
    save_tiny(tmp_path / "model")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_text(" ".join("hgfedcba"[i % 8] for i in range(3000)))
    args = ["train", "--model", str(tmp_path / "model")]
    args += ["--data", _text_file(tmp_path), str(tmp_path / "books")]
    args += ["--budget", "8", "--seq-len", "32", "--sequences", "2", "--epochs", "1"]
    args += ["--rank", "4", "--hidden", "16", "--out", str(tmp_path / "k")]
    args += ["--val-fraction", "0", "--select", "last", "--dropout", "0", "--lr-halving", "3"]
    args += ["--spread"]
    assert main(args) == 0
    run = json.loads((tmp_path / "k" / "run.json").read_text())
    assert run["data"] == f"{tmp_path / 't.txt'} + {tmp_path / 'books'}"
    knobs = ("val_fraction", "select", "dropout", "lr_halving_epochs", "spread")
    assert [run[k] for k in knobs] == [0.0, "last", 0.0, 3, True]


def test_an_unsupported_family_is_refused_before_any_work(capsys, tmp_path):
    from transformers import AutoModelForCausalLM, GPTJConfig

    config = GPTJConfig(vocab_size=97, n_embd=32, n_layer=1, n_head=2, rotary_dim=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gptj")
    tiny_tokenizer().save_pretrained(tmp_path / "gptj")
    args = ["eval", "ppl", "--model", str(tmp_path / "gptj"), "--data", _text_file(tmp_path)]
    args += ["--budget", "8", "--methods", "less", "--kernels", str(tmp_path / "nowhere")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lesskv: error: GPTJForCausalLM has no attention modules")


HOSTILE_DATA = {
    "empty.txt": b"",
    "blank.jsonl": b'{"text": " "}\n\n',
    "binary.txt": b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x00",
    "latin1.txt": "caf\u00e9 cr\u00e8me ".encode("latin-1") * 50,
    "bad-line.jsonl": b'{"text": "fine"}\n{"text": "broken\n',
    "no-field.jsonl": b'{"body": "the text is elsewhere"}\n',
    "not-records.json": b'{"text": "an object, not a list"}',
}


def test_hostile_data_files_are_one_line_errors_and_nothing_is_written(capsys, tmp_path):
    """Every command that reads --data: exit 2, one line naming the file, no output."""
    save_tiny(tmp_path / "model")
    model = str(tmp_path / "model")
    capsys.readouterr()  # saving the model prints progress
    for name, content in HOSTILE_DATA.items():
        data = tmp_path / name
        data.write_bytes(content)
        out = tmp_path / f"out-{name}"
        commands = [
            [
                "eval",
                "ppl",
                "--model",
                model,
                "--data",
                str(data),
                "--budget",
                "8",
                "--json",
                str(out),
            ],
            ["train", "--model", model, "--data", str(data), "--budget", "8", "--out", str(out)],
            ["bench", "--model", model, "--data", str(data), "--json", str(out)],
        ]
        for command in commands:
            assert main(command) == 2, (name, command[0])
            err = capsys.readouterr().err.strip()
            assert err.startswith("lesskv: error:") and "\n" not in err, (name, err)
            assert name in err, (name, err)
            assert not out.exists(), (name, command[0])


def test_a_command_whose_optional_extra_is_missing_names_it_in_one_line(capsys, monkeypatch):
    """A plain `pip install lesskv` has no lm-eval or datasets: say which extra brings them."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main(["eval", "tasks", "--tasks", "piqa"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lesskv: error: lesskv eval tasks needs the optional package lm_eval: "
        "pip install 'lesskv[tasks]'"
    )
    assert main(["eval", "ppl", "--data", "hf:wikitext", "--budget", "8"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lesskv: error: --data hf:wikitext needs the optional package datasets: "
        "pip install 'lesskv[hf]'"
    )


def test_training_on_a_device_this_machine_lacks_is_one_line_before_any_work(capsys, tmp_path):
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or the first of none
    for command in ("train", "finetune"):
        for device, reason in ((missing, "this machine has"), ("banana", "not a device")):
            out = tmp_path / f"{command}-{device}"
            args = [command, "--device", device, "--data", "builtin", "--budget", "8"]
            assert main([*args, "--out", str(out)]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"lesskv: error: --device {device}") and reason in err, err
            assert "\n" not in err and not out.exists()


def test_train_a_bf16_model_stores_bf16_activations_and_fits_fp32_kernels(capsys, tmp_path):
    save_tiny(tmp_path / "model")
    args = ["train", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    args += ["--dtype", "bfloat16", "--device", "cpu", "--budget", "8", "--seq-len", "48"]
    args += ["--sequences", "4", "--epochs", "1", "--rank", "4", "--hidden", "16"]
    assert main([*args, "--out", str(tmp_path / "kernels")]) == 0
    config = json.loads((tmp_path / "kernels" / "lesskv_kernels.json").read_text())
    assert all(torch.isfinite(torch.tensor(v)) for v in config["val_loss"].values())


def test_eval_ppl_with_a_device_map_scores_like_the_plain_load(capsys, tmp_path):
    save_tiny(tmp_path / "model")
    args = ["eval", "ppl", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    args += ["--seq-len", "32", "--windows", "2", "--budget", "8", "--methods", "full,baseline"]
    assert main([*args, "--json", str(tmp_path / "plain.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    for device_map in ("cpu", '{"": "cpu"}', "auto"):
        out = tmp_path / f"{device_map[:4]}.json"
        assert main([*args, "--device-map", device_map, "--json", str(out)]) == 0
        assert json.loads(out.read_text()) == plain
    capsys.readouterr()


MODEL_COMMANDS = [
    ["generate", "--prompt", "the cat"],
    ["bench"],
    ["eval", "ppl", "--data", "builtin", "--budget", "8"],
    ["eval", "tasks", "--tasks", "piqa"],
    ["eval", "summarize"],
    ["train", "--data", "builtin", "--budget", "8", "--out"],
    ["finetune", "--data", "builtin", "--budget", "8", "--out"],
]


def test_a_bad_device_map_is_one_line_before_any_work_in_every_command(capsys, tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"
    bad = [
        (["--device-map", "banana"], "--device-map 'banana': not a device"),
        (["--device-map", missing], f"--device-map '{missing}': this machine has"),
        (["--device-map", '{"model.layers.0": "disk"}'], "offloading is not supported"),
        (["--device-map", "{nope"], "--device-map: not a JSON object"),
        (["--device", "cpu", "--device-map", "cpu"], "--device and --device-map exclude"),
    ]
    out = tmp_path / "out"
    for command in MODEL_COMMANDS:
        for options, message in bad:
            args = [*command, str(out)] if command[-1] == "--out" else command
            assert main([*args, *options]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("lesskv: error: ") and message in err, (command, err)
            assert "\n" not in err and not out.exists()


def test_cuda_graphs_without_a_gpu_is_one_line_before_any_work(capsys, monkeypatch):
    import lesskv.hf.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", no_loading)
    commands = [
        ["generate", "--prompt", "Hello", "--method", "baseline", "--cuda-graphs"],
        ["bench", "--data", "builtin", "--cuda-graphs", "--device", "cpu"],
        ["eval", "summarize", "--data", "xsum", "--samples", "1", "--cuda-graphs"],
    ]
    for command in commands:
        assert main(command) == 2, command[0]
        err = capsys.readouterr().err.strip()
        assert err.startswith("lesskv: error: --cuda-graphs needs the model on a CUDA GPU"), err
        assert "\n" not in err


def test_train_collects_layers_in_groups_within_the_store_budget(capsys, tmp_path):
    from lesskv.training.store import ActivationStore

    save_tiny(tmp_path / "model")
    capsys.readouterr()  # saving the model prints progress
    args = ["train", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    args += ["--budget", "8", "--seq-len", "48", "--sequences", "4", "--epochs", "1"]
    args += ["--rank", "4", "--hidden", "16", "--out", str(tmp_path / "kernels")]
    one_layer = ActivationStore.nbytes(n=4, hq=6, hkv=2, t=48, d=16, hidden=96)
    assert main([*args, "--store-budget", str(one_layer - 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert err.startswith(f"lesskv: error: one layer's activations need {one_layer} bytes")
    assert not (tmp_path / "kernels").exists()
    assert main([*args, "--store-budget", str(one_layer)]) == 0
    assert (tmp_path / "kernels" / "lesskv_kernels.json").exists()


def test_a_budget_is_parsed_once_from_the_command_line_to_the_cache(capsys, tmp_path, monkeypatch):
    """``--budget 25%`` is text only where it enters: argparse parses it, and the policy, the
    cache and each of its layers receive that Budget; the cache resolves it once, against the
    prompt."""
    save_tiny(tmp_path / "model")
    parse, texts, caches = Budget.parse.__func__, [], []
    monkeypatch.setattr(
        Budget, "parse", classmethod(lambda cls, v: texts.append(v) or parse(cls, v))
    )
    init = LessCache.__init__
    monkeypatch.setattr(
        LessCache, "__init__", lambda self, *a, **k: caches.append(self) or init(self, *a, **k)
    )
    args = ["generate", "--model", str(tmp_path / "model"), "--method", "baseline"]
    prompt = " ".join(WORDS[2:] * 5)  # 40 words
    assert main([*args, "--budget", "25%", "--prompt", prompt, "--max-new-tokens", "3"]) == 0
    assert [t for t in texts if not isinstance(t, Budget)] == ["25%"]
    (cache,) = caches
    assert cache.policy.budget == Budget(0.25)
    prompt_tokens = len(tiny_tokenizer()(prompt).input_ids)
    assert cache.layers[0].capacity == round(0.25 * prompt_tokens)
    capsys.readouterr()


def _bad_outputs(tmp_path):
    """Every output option of every command, aimed below a file (no folder can go there)."""
    bad = str(tmp_path / "a-file" / "out")
    outputs = [
        (["eval", "ppl", "--data", "builtin", "--budget", "8"], "--json"),
        (["eval", "summarize"], "--json"),
        (["bench", "--data", "builtin"], "--json"),
        (["bench", "--data", "builtin"], "--plot"),
        (["train", "--data", "builtin", "--budget", "8"], "--out"),
        (["finetune", "--data", "builtin", "--budget", "8"], "--out"),
        *((["analyze", analysis], "--out") for analysis in ("residual", "oracle", "layers")),
        (["analyze", "attention"], "--out"),
    ]
    try:
        import lm_eval  # noqa: F401
    except ImportError:  # eval tasks says so first, before its outputs
        pass
    else:
        outputs.append((["eval", "tasks", "--tasks", "piqa"], "--json"))
    return [([*command, option, bad], option) for command, option in outputs]


def test_an_output_that_cannot_be_written_is_one_line_before_any_model_is_loaded(
    capsys, tmp_path, monkeypatch
):
    """The results are written last: a path they cannot go to is found first, not after
    the work (the JSON of `eval ppl --json /proc/x/out.json` used to be lost so)."""
    import lesskv.hf.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", no_loading)
    (tmp_path / "a-file").write_text("not a folder")
    for command, option in _bad_outputs(tmp_path):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"lesskv: error: cannot write {option} "), (command, err)
        assert err.endswith("a-file is not a directory") and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing left behind
    plot = ["bench", "--data", "builtin", "--plot", str(tmp_path / "speed.jpgx")]
    assert main(plot) == 2
    assert "matplotlib writes no .jpgx figures" in capsys.readouterr().err


def test_bench_with_one_method_writes_its_results(capsys, tmp_path):
    """One method has no ratios to tabulate: the JSON and the figure, written after that
    table, are still written (whole: no temporary file left beside them)."""
    save_tiny(tmp_path / "model")
    args = ["bench", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    args += ["--contexts", "32", "--batch-sizes", "1", "--new-tokens", "2", "--methods", "full"]
    results = tmp_path / "results"
    args += ["--no-compile", "--json", str(results / "b.json"), "--plot", str(results / "b.png")]
    assert main(args) == 0
    assert json.loads((results / "b.json").read_text())[0]["method"] == "full"
    assert sorted(p.name for p in results.iterdir()) == ["b.json", "b.png"]
    capsys.readouterr()


def test_kernels_of_another_rank_than_their_config_are_one_short_line(capsys, tmp_path):
    """torch names every mismatched tensor of every layer (10,000 characters on a real
    model); the error names the first and counts them."""
    model = save_tiny(tmp_path / "model")
    kernel_set(model).save_pretrained(tmp_path / "kernels")  # rank 4
    config = tmp_path / "kernels" / "lesskv_kernels.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rank": 8}))
    args = ["eval", "ppl", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    args += ["--seq-len", "32", "--budget", "8", "--methods", "less"]
    assert main([*args, "--kernels", str(tmp_path / "kernels")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"lesskv: error: {tmp_path / 'kernels' / 'kernels.safetensors'}")
    assert "layers.0." in err and "in the file" in err and "by the config" in err, err
    assert err.endswith("mismatched tensor(s) in all)") and len(err) < 300, err


def test_a_size_too_large_for_memory_is_one_line_not_a_traceback(capsys, tmp_path, monkeypatch):
    """Each count fits int64 (parse time), yet a rank that large sizes a state whose bytes
    overflow: that is a size the machine cannot hold, said in one line; a RuntimeError that
    is not about memory stays a traceback (a bug to see)."""
    save_tiny(tmp_path / "model")
    args = ["eval", "ppl", "--model", str(tmp_path / "model"), "--data", _text_file(tmp_path)]
    args += ["--seq-len", "32", "--windows", "1", "--budget", "8", "--methods", "merge"]
    assert main([*args, "--rank", str(2**63 - 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lesskv: error: not enough memory for the sizes asked for"), err
    assert len(err) < 300

    import lesskv.hf.loading as loading

    def a_bug(*args, **kwargs):
        raise RuntimeError("shape '[2, 3]' is invalid for input of size 7")

    monkeypatch.setattr(loading, "load_model", a_bug)
    with pytest.raises(RuntimeError, match="is invalid"):
        main(args)


def _error_line(capsys) -> str:
    """The one error line on stderr (after any progress bars), checked to be the only one."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("lesskv: error:") == 1, err
    return err.strip().splitlines()[-1]


def test_a_path_too_long_for_the_system_is_one_short_line_in_every_option(capsys, tmp_path):
    """A 5,000-character name fails the first stat() of it, wherever the command looks at
    it first: one line, the path cut in its middle so the reason fits, nothing written. An
    OSError naming no file is no path given, and stays a traceback."""
    save_tiny(tmp_path / "model")
    model, long = str(tmp_path / "model"), str(tmp_path / ("a" * 5000))
    ppl = ["eval", "ppl", "--model", model, "--data", "builtin", "--budget", "8", "--seq-len", "32"]
    commands = [
        [*ppl, "--json", long],
        [*ppl, "--methods", "less", "--kernels", long],
        ["eval", "ppl", "--model", long, "--data", "builtin", "--budget", "8"],
        ["eval", "summarize", "--model", model, "--methods", "full", "--data", long],
        ["generate", "--model", model, "--method", "baseline", "--file", long],
        ["train", "--model", model, "--data", "builtin", "--budget", "8", "--out", long],
    ]
    for command in commands:
        assert main(command) == 2, command
        err = _error_line(capsys)
        assert err.endswith("aaa: File name too long") and len(err) < 200, err
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    import lesskv.hf.loading as loading

    def broken_disk(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch = pytest.MonkeyPatch.context()
    with monkeypatch as patch, pytest.raises(OSError, match="Input/output"):
        patch.setattr(loading, "load_model", broken_disk)
        main(ppl)


def test_numbers_that_would_overflow_inside_torch_are_one_line(capsys, tmp_path):
    """A temperature of 1e-300 divides the logits into infinities that sampling cannot draw
    from; a batch of 2**63 - 1 prompts overflows the count of the index torch builds, one of
    2**62 sharing a prefill the count of the cache's elements."""
    save_tiny(tmp_path / "model")
    model = str(tmp_path / "model")
    args = ["generate", "--model", model, "--method", "baseline", "--prompt", "a b", "--sample"]
    assert main([*args, "--temperature", "1e-300"]) == 2
    assert "argument --temperature: must be >= 0.01, got 1e-300" in _error_line(capsys)
    bench = ["bench", "--model", model, "--data", "builtin", "--contexts", "32"]
    bench += ["--methods", "full", "--no-compile", "--batch-sizes"]
    for batch in ([str(2**63 - 1)], [str(2**62), "--shared-prefill"]):
        assert main([*bench, *batch]) == 2
        err = _error_line(capsys)
        assert err.startswith("lesskv: error: not enough memory for the sizes asked for"), err
        assert len(err) < 300
