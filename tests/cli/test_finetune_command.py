"""``lesskv finetune``'s own switch: per-layer checkpointing, on unless turned off."""

import pytest

from helpers import kernel_set, save_tiny
from lesskv.cli import main
from lesskv.errors import LessKVError
from lesskv.training import finetune


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-checkpointing"], False)])
def test_checkpointing_reaches_the_fine_tuning(tmp_path, monkeypatch, flag, expected):
    model = save_tiny(tmp_path / "model")
    kernel_set(model).save_pretrained(tmp_path / "kernels")
    (tmp_path / "t.txt").write_text(" ".join("abcdefgh"[i % 8] for i in range(3000)))
    asked = []

    def record(*args, checkpointing, **kwargs):
        asked.append(checkpointing)
        raise LessKVError("stopped before training")

    monkeypatch.setattr(finetune, "finetune_kernels", record)
    args = ["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "t.txt")]
    args += ["--kernels", str(tmp_path / "kernels"), "--seq-len", "32", "--sequences", "2"]
    assert main([*args, "--out", str(tmp_path / "tuned"), *flag]) == 2
    assert asked == [expected]
