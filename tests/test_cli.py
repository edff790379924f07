"""The command line: help that explains itself, and one-line errors for bad input."""

import json

import pytest
import torch

from lesskv.cli import main
from test_models import save_tiny


def test_help_explains_the_methods(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "baseline+" in out and "low-rank" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "nope", "--budget", "8"], "unknown policy"),
        (["--budget", "0"], "budget must be > 0"),
        (["--budget", "1.5"], "ambiguous"),
        (["--policy", "lambda", "--budget", "4"], "sinks"),
        (["--budget", "8", "--methods", "full,magic"], "unknown method"),
        (["--budget", "8", "--data", "/no/such/file.txt"], "file.txt"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(capsys, tmp_path, args, message):
    base = ["eval", "ppl", "--data", str(tmp_path / "x.txt")]
    (tmp_path / "x.txt").write_text("hello world " * 50)
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesskv: error:") and message in err and "\n" not in err


def test_empty_text_and_missing_field(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(["eval", "ppl", "--data", str(tmp_path / "empty.txt"), "--budget", "8"]) == 2
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    args = ["eval", "ppl", "--data", str(tmp_path / "d.jsonl"), "--field", "text", "--budget", "8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "empty" in err.lower() and "body" in err


def test_eval_ppl_on_a_local_model(capsys, tmp_path):
    save_tiny(tmp_path / "model")
    torch.manual_seed(0)
    (tmp_path / "t.txt").write_text(" ".join("abcdefgh"[i % 8] for i in range(3000)))
    common = ["eval", "ppl", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "t.txt")]
    too_long = [*common, "--seq-len", "100000", "--budget", "8"]
    assert main(too_long) == 2
    assert "context" in capsys.readouterr().err
    out_json = tmp_path / "rows.json"
    args = [*common, "--seq-len", "32", "--windows", "2", "--budget", "8", "--json", str(out_json)]
    assert main(args) == 0
    rows = json.loads(out_json.read_text())
    assert [r["method"] for r in rows] == ["full", "baseline", "baseline+"]
    assert {"method", "policy", "budget_tokens", "ppl", "nll", "tokens"} <= rows[0].keys()
    assert rows[1]["budget_tokens"] == 8 and rows[0]["tokens"] == 2 * 31
    assert "| method" in capsys.readouterr().out


def test_kernels_for_another_policy_need_transfer(capsys, tmp_path):
    from test_cache import kernel_set

    model = save_tiny(tmp_path / "model")
    kernel_set(model, policy="lambda").save_pretrained(tmp_path / "kernels")
    (tmp_path / "t.txt").write_text(" ".join("abcdefgh"[i % 8] for i in range(3000)))
    args = ["eval", "ppl", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "t.txt")]
    args += ["--seq-len", "32", "--windows", "1", "--policy", "h2o", "--budget", "8"]
    args += ["--methods", "less", "--kernels", str(tmp_path / "kernels")]
    assert main(args) == 2
    assert "trained for policy 'lambda'" in capsys.readouterr().err
    assert main([*args, "--transfer"]) == 0


def test_finetune_writes_kernels_and_reports_the_validation_kl(capsys, tmp_path):
    from test_cache import kernel_set

    model = save_tiny(tmp_path / "model")
    kernel_set(model).save_pretrained(tmp_path / "kernels")
    (tmp_path / "t.txt").write_text(" ".join("abcdefgh"[i % 8] for i in range(3000)))
    args = ["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "t.txt")]
    args += ["--kernels", str(tmp_path / "kernels"), "--seq-len", "32", "--sequences", "2"]
    args += ["--val-sequences", "1", "--out", str(tmp_path / "tuned")]
    assert main(args) == 0
    assert "validation KL" in capsys.readouterr().out
    config = json.loads((tmp_path / "tuned" / "lesskv_kernels.json").read_text())
    assert config["finetune"]["steps"] == 2 and "lesskv finetune" in config["command"]
    assert main([*args[:-2], "--sequences", "0", "--out", str(tmp_path / "x")]) == 2
