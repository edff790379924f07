"""docs/soak.py, the long-generation memory soak, on a short run (the 50,000-token run and its
curve are in docs/RESULTS.md, Reliability)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "soak.py"


@pytest.mark.slow
def test_memory_stays_flat_and_the_curve_is_drawn(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    samples = soak.soak(tokens=1500, every=50)
    assert samples[-1]["tokens"] == 32 + 1500
    flat, summary = soak.is_flat(samples)
    assert flat, summary
    soak.plot(samples, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    # the check can fail: a cache that grew would be caught
    grown = [dict(s, cache_bytes=s["cache_bytes"] + i) for i, s in enumerate(samples)]
    assert not soak.is_flat(grown)[0]
