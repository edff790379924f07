"""Activation stores on disk: their dtypes, sizes and completion markers, and the budget
that groups layers."""

import shutil

import pytest
import torch

from lesskv.errors import LessKVError
from lesskv.training.store import COMPLETE_FILE, ActivationStore, default_store_budget, store_groups


def test_a_bf16_models_activations_keep_their_range_and_dtype(tmp_path):
    """fp16 would turn 70000 into inf; a store is never read back as another dtype."""
    shape = dict(n=1, hq=1, hkv=1, t=3, d=1, hidden=1, kept=1)
    store = ActivationStore(tmp_path, 0, **shape, dtype=torch.bfloat16)
    query = torch.tensor([70000.0, -3.5, 1e-3]).view(1, 3, 1).bfloat16()
    store.write(0, query=query, steps=torch.tensor([[3, 3, 3]]))
    batch = store.read([0])
    assert torch.equal(batch["query"][0], query.float())
    assert batch["steps"].tolist() == [[[3, 3, 3]]]
    with pytest.raises(LessKVError, match="stored as bf16.*this run stores f16"):
        ActivationStore(tmp_path, 0, **shape, dtype=torch.float32)


def test_a_stores_size_is_known_before_it_exists(tmp_path):
    dims = dict(n=3, hq=6, hkv=2, t=10, d=4, hidden=20)
    for dtype in (torch.float32, torch.bfloat16):
        store = ActivationStore(tmp_path / str(dtype), 0, **dims, kept=2, dtype=dtype)
        on_disk = sum(p.stat().st_size for p in store.dir.iterdir())
        assert on_disk == ActivationStore.nbytes(**dims)


def test_layers_go_in_consecutive_groups_that_fit_the_budget():
    assert store_groups({0: 3, 1: 3, 2: 3, 3: 5, 4: 1}, 6) == [[0, 1], [2], [3, 4]]
    assert store_groups({2: 4, 5: 4}, 100) == [[2, 5]]
    assert store_groups({}, 1) == [[]]


def test_the_default_store_budget_is_half_the_free_disk_where_out_will_be(tmp_path, monkeypatch):
    asked = []

    def disk_usage(path):
        asked.append(path)
        return shutil._ntuple_diskusage(1000, 200, 801)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    assert default_store_budget(tmp_path / "not" / "yet") == 400
    assert asked == [tmp_path]


def test_a_damaged_completion_marker_is_one_line_not_a_resume(tmp_path):
    """The marker counts the windows on disk: one that is not a count of them (a torn disk,
    an edit) is named with what to do, rather than a ValueError or a resume past them."""
    dims = dict(n=5, hq=2, hkv=1, t=4, d=3, hidden=6, kept=1)
    ActivationStore(tmp_path, 0, **dims).mark_complete(2)
    marker = tmp_path / "len_4" / "layer_000" / COMPLETE_FILE
    assert ActivationStore(tmp_path, 0, **dims).complete == 2
    for text in ("garbage", "99", "-1", "\xb2", "\x00\xff"):
        marker.write_bytes(text.encode("latin-1"))
        with pytest.raises(LessKVError, match="complete is corrupt .*; delete it and rerun"):
            ActivationStore(tmp_path, 0, **dims)
