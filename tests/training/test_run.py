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


def test_a_damaged_run_file_is_named_and_replaced_only_with_overwrite(tmp_path):
    for content in (b"{broken", b"[1, 2]", b"\xff\xfe"):
        (tmp_path / RUN_FILE).write_bytes(content)
        (tmp_path / "layer_000.safetensors").write_bytes(b"x")
        with pytest.raises(LessKVError, match="run.json is corrupt .*pass --overwrite"):
            claim_output_dir(tmp_path, Config(), overwrite=False)
        claim_output_dir(tmp_path, Config(), overwrite=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, RUN_FILE]


def _fail(claim, error=RuntimeError, work="layers/*"):
    """Run a block that writes scratch, then raises ``error``, under ``claim``'s undo."""
    with pytest.raises(error), claim.undone_on_error(work):
        (claim.out / "activations").mkdir(exist_ok=True)
        raise error("out of memory")


def test_a_first_attempt_that_fails_before_any_work_leaves_nothing(tmp_path):
    """The run file, its scratch and the folders made for it go; an existing folder stays."""
    _fail(claim_output_dir(tmp_path / "runs" / "a", Config(), overwrite=False, shared=True))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    _fail(claim_output_dir(tmp_path / "mine", Config(), overwrite=False))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [LOCK_FILE]


def test_a_run_with_work_resumed_interrupted_or_joined_keeps_its_files(tmp_path):
    out = tmp_path / "out"
    claim = claim_output_dir(out, Config(), overwrite=False, shared=True)
    (out / "layers").mkdir()
    (out / "layers" / "layer_001.safetensors").write_bytes(b"x")
    _fail(claim)  # a layer is trained
    (out / "layers" / "layer_001.safetensors").unlink()
    _fail(claim_output_dir(out, Config(), overwrite=False, shared=True))  # resumed
    _fail(claim, KeyboardInterrupt)  # a rerun resumes it
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "activations", "layers", RUN_FILE]
    fresh = tmp_path / "fresh"
    claim = claim_output_dir(fresh, Config(), overwrite=False, shared=True)
    holder = _holder(fresh, "shared")
    try:
        assert holder.stdout.readline().strip() == "claimed"  # it joined
        _fail(claim)
        assert sorted(p.name for p in fresh.iterdir()) == [LOCK_FILE, "activations", RUN_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_a_run_stored_before_a_knob_existed_resumes_at_its_default(tmp_path):
    """Kernels half-trained by an older lesskv (its run.json lacks a newer knob) resume when
    this run asks for that knob's default, and only then."""

    @dataclass
    class Newer:
        epochs: int = 1
        select: str = "best"

    claim_output_dir(tmp_path, Config(), overwrite=False)
    (tmp_path / "layer_000.safetensors").write_bytes(b"x")
    assert not claim_output_dir(tmp_path, Newer(), overwrite=False).started
    with pytest.raises(LessKVError, match="differs in select"):
        claim_output_dir(tmp_path, Newer(select="last"), overwrite=False)
