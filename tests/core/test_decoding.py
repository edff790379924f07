"""One decoding step of a layer's attention: the sparse part, the policy's scores and LESS's
state in one function, compiled and eager alike, and the eager fallback."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from test_state import _step_inputs

from lesskv.core import decoding, state
from lesskv.core.policies import POLICIES, make_policy

SLOTS, SCALE = 7, 0.25


def _inputs(policy="h2o", less=True, seed=0):
    kernels, query, _, _, evicted, state_h, state_z = _step_inputs(seed=seed)
    b, hkv, _, _, d = query.shape
    keys, values = torch.randn(b, hkv, SLOTS, d), torch.randn(b, hkv, SLOTS, d)
    valid = torch.rand(b, hkv, SLOTS) > 0.3
    valid[..., 0] = True
    scores = torch.rand(b, hkv, SLOTS)
    lss = (kernels, evicted, state_h, state_z) if less else None
    return make_policy(policy, SLOTS), query, keys, values, valid, scores, SCALE, lss


def _run(step, inputs, **options):
    """``step`` on copies of everything it updates in place: (out, lse, scores, H, z)."""
    policy, query, keys, values, valid, scores, scale, less = inputs
    scores = scores.clone()
    if less is not None:
        kernels, evicted, h, z = less
        less = kernels, evicted, h.clone(), z.clone()
    with torch.no_grad():
        out, lse = step(policy, query, keys, values, valid, scores, scale, less, **options)
    return (out, lse, scores) + (less[2:] if less is not None else ())


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_step_is_masked_softmax_then_scores_then_state(policy):
    inputs = _inputs(policy)
    pol, query, keys, values, valid, scores, scale, (kernels, evicted, h, z) = inputs
    out, lse, got_scores, got_h, got_z = _run(decoding.decode_attention, inputs)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", query, keys) * scale
    logits = logits.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    probs = logits.softmax(-1)
    want_lse = logits.logsumexp(-1, keepdim=True)
    sparse = probs @ values.unsqueeze(2)
    want_scores = pol.update_scores(scores.clone(), probs) if pol.uses_attention else scores
    want_h, want_z = h.clone(), z.clone()
    with torch.no_grad():
        want = state.decode_step(kernels, query, sparse, want_lse, evicted, want_h, want_z)
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(got_scores, want_scores)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h, want_h)
    torch.testing.assert_close(got_z, want_z)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("less", [True, False], ids=["less", "sparse"])
def test_compiled_equals_eager(policy, less):
    inputs = _inputs(policy, less)
    step = decoding.Compiled(decoding.decode_attention)
    eager = _run(step, inputs, enabled=False)
    compiled = _run(step, inputs)
    assert not step.failed and step.compile_seconds > 0
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    seconds = step.compile_seconds
    _run(step, _inputs(policy, less, seed=1))  # same shapes: nothing new compiled or counted
    assert step.compile_seconds == seconds


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **_):
        def call(*args):
            raise RuntimeError("no C++ compiler found")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    inputs = _inputs()
    step = decoding.Compiled(decoding.decode_attention)
    with pytest.warns(RuntimeWarning, match="could not compile its decoding step"):
        result = _run(step, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call stays quiet
        again = _run(step, inputs)
    eager = _run(decoding.decode_attention, inputs)
    for a, b, c in zip(result, again, eager, strict=True):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


@pytest.mark.slow
def test_without_a_cxx_compiler_decoding_runs_eager(tmp_path):
    """The real case: inductor finds no compiler (fresh cache dir, so nothing compiled before
    can be reused)."""
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, {tests!r})
        from test_decoding import _inputs, _run
        from lesskv.core import decoding
        inputs = _inputs()
        got = _run(decoding.compiled_decode_attention, inputs)
        want = _run(decoding.decode_attention, inputs)
        assert decoding.compiled_decode_attention.failed
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        print("eager fallback ok")
        """
    ).format(tests=str(Path(__file__).parent))
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-c++"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eager fallback ok" in done.stdout
    assert done.stderr.count("could not compile its decoding step") == 1
