"""The run folder every training stage claims: locked against a second writer."""

import subprocess
import sys
from dataclasses import dataclass

import pytest

from lesskv.errors import LessKVError
from lesskv.training.run import LOCK_FILE, RUN_FILE, claim_output_dir


@dataclass
class Config:
    epochs: int = 1


HOLD = """
import sys, time
from pathlib import Path
from lesskv.training.run import claim_output_dir
from dataclasses import dataclass
@dataclass
class Config:
    epochs: int = 1
claim_output_dir(Path(sys.argv[1]), Config(), False, shared=sys.argv[2] == "shared")
print("claimed", flush=True)
time.sleep(60)
"""


def _holder(folder, mode):
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), mode], stdout=subprocess.PIPE, text=True
    )


def test_a_second_process_on_the_same_folder_is_refused(tmp_path):
    holder = _holder(tmp_path, "alone")
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(LessKVError, match="in use by another lesskv run"):
            claim_output_dir(tmp_path, Config(), overwrite=True)
        assert (tmp_path / RUN_FILE).exists()  # the holder's run is untouched
    finally:
        holder.kill()
        holder.wait()
    claim_output_dir(tmp_path, Config(), overwrite=False)  # free once its holder is gone


def test_the_same_process_resumes_and_overwrites_around_its_lock(tmp_path):
    claim_output_dir(tmp_path, Config(), overwrite=False)
    claim_output_dir(tmp_path, Config(), overwrite=False)  # a resumed call
    (tmp_path / "layer_000.safetensors").write_bytes(b"x")
    with pytest.raises(LessKVError, match="another training run"):
        claim_output_dir(tmp_path, Config(epochs=2), overwrite=False)
    claim_output_dir(tmp_path, Config(epochs=2), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, RUN_FILE]


def test_processes_of_one_shared_run_join_and_others_are_refused(tmp_path):
    """Per-layer training splits its layers across processes (--layers) on one folder: the
    same configuration joins, another one (or --overwrite) is refused while it runs."""
    holder = _holder(tmp_path, "shared")
    try:
        assert holder.stdout.readline().strip() == "claimed"
        claim_output_dir(tmp_path, Config(), overwrite=False, shared=True)  # joins
        with pytest.raises(LessKVError, match="in use by another lesskv run"):
            claim_output_dir(tmp_path, Config(epochs=2), overwrite=True, shared=True)
        with pytest.raises(LessKVError, match="in use by another lesskv run"):
            claim_output_dir(tmp_path, Config(), overwrite=False)  # not a shared stage
        assert (tmp_path / RUN_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
