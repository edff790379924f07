"""Layer-parallel training under torchrun: real 2-process gloo jobs on a tiny model."""

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from helpers import WORDS, make_tiny_model, tiny_tokenizer
from lesskv.cli import main
from lesskv.core.policies import make_policy
from lesskv.hf.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from lesskv.training import checkpoints
from lesskv.training import per_layer as train
from lesskv.training.distributed import TORCHRUN_ENV, shard

LAYERS = 4
EPOCHS = 12  # about a second a layer on 2 busy cores: long enough to kill a rank mid-run


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, list[str]]:
    """A saved tiny model, its text, the `lesskv train` arguments and the single-process run."""
    root = tmp_path_factory.mktemp("distributed")
    make_tiny_model("llama-gqa", num_hidden_layers=LAYERS).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    words = random.Random(0).choices(WORDS[2:], k=2000)
    (root / "text.txt").write_text(" ".join(words))
    args = ["train", "--model", str(root / "model"), "--data", str(root / "text.txt")]
    args += ["--budget", "8", "--seq-len", "64", "--sequences", "12", "--epochs", str(EPOCHS)]
    args += ["--rank", "4", "--hidden", "32"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the result does not depend on it; tiny ops just run faster
    try:
        assert main([*args, "--out", str(root / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, args


def torchrun(args: list[str], out: Path, log) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node 2 -m lesskv ARGS --out OUT`` (a free port)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "lesskv", *args, "--out", str(out)]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def run_to_end(args: list[str], out: Path) -> str:
    log_path = out.with_suffix(".log")
    with log_path.open("w") as log:
        assert torchrun(args, out, log).wait(timeout=300) == 0, log_path.read_text()[-4000:]
    return log_path.read_text()


def layer_files(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (out / "layers").glob("layer_*.safetensors")}


def assert_same_kernels(a: Path, b: Path) -> None:
    assert (a / WEIGHTS_FILE).read_bytes() == (b / WEIGHTS_FILE).read_bytes()
    losses = [json.loads((d / CONFIG_FILE).read_text())["val_loss"] for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == LAYERS


def test_two_gloo_ranks_train_exactly_what_one_process_trains(job):
    root, args = job
    log = run_to_end(args, root / "two")
    assert [int(n) for n in re.findall(r"trained (\d+) layer", log)] == [2, 2]  # 2 ranks x 2
    assert_same_kernels(root / "single", root / "two")


@pytest.mark.slow  # a second torchrun job: about 40 s on 2 cores
def test_a_killed_rank_loses_only_unfinished_layers_and_a_rerun_completes(job):
    root, args = job
    out = root / "killed"
    with (root / "killed-first.log").open("w") as log:
        agent = torchrun(args, out, log)
        deadline = time.monotonic() + 120
        while not ((out / "layers").is_dir() and layer_files(out)):
            assert agent.poll() is None and time.monotonic() < deadline, "no layer finished"
            time.sleep(0.05)
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(agent.pid).children()}
        ranks["1"].kill()  # SIGKILL: no cleanup at all; torchrun then stops rank 0
        assert agent.wait(timeout=60) != 0
    finished = layer_files(out)
    assert 0 < len(finished) < LAYERS and not (out / WEIGHTS_FILE).exists()
    for path in finished:
        load_file(path)  # complete and readable, never half-written
    log = run_to_end(args, out)
    retrained = sum(int(n) for n in re.findall(r"trained (\d+) layer", log))
    assert layer_files(out).items() >= finished.items()  # finished layers were left alone
    assert retrained == LAYERS - len(finished)
    assert_same_kernels(root / "single", out)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7])
def test_shards_are_contiguous_balanced_and_cover_every_layer(n):
    layers = list(range(10, 10 + n))
    shares = [shard(layers, rank, 3) for rank in range(3)]
    assert sum(shares, []) == layers
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("flag", [["--distributed"], []])
def test_distributed_without_torchrun_env_is_one_clear_error(capsys, monkeypatch, tmp_path, flag):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    if not flag:  # WORLD_SIZE > 1 alone means a launcher started us: distributed is implied
        monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["train", "--data", "builtin", "--budget", "8", "--out", str(tmp_path), *flag]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesskv: error:") and "torchrun" in err and "\n" not in err


def test_a_crash_while_writing_leaves_no_partial_layer_file(monkeypatch, tmp_path):
    model = make_tiny_model("llama-gqa")
    torch.manual_seed(0)
    windows = torch.randint(0, 97, (4, 32))
    config = train.TrainConfig("tiny", "h2o", "8", seq_lens=[32], sequences=4, epochs=1, rank=4)
    writes = []

    def crash_on_second_layer(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 2:
            Path(path).write_bytes(b"\0" * 64)  # half a file, then the disk fails
            raise OSError("disk full")
        train_save(tensors, path, metadata=metadata)

    train_save = checkpoints.save_file
    monkeypatch.setattr(checkpoints, "save_file", crash_on_second_layer)
    with pytest.raises(OSError, match="disk full"):
        train.train_kernels(model, windows, make_policy("h2o", 8), config, tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "layers").iterdir()] == ["layer_000.safetensors"]
    load_file(tmp_path / "layers" / "layer_000.safetensors")
