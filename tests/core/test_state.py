"""LESS's decoding state: the one-step function, compiled and eager, and its fallback."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from lesskv.core import state
from lesskv.core.kernels import KernelShape, LayerKernels


def _step_inputs(batch=2, kv_heads=2, groups=3, dim=16, seed=0):
    torch.manual_seed(seed)
    kernels = LayerKernels(KernelShape(kv_heads * groups, kv_heads, dim, rank=4, hidden=8)).eval()
    with torch.no_grad():
        for p in kernels.parameters():
            p.normal_(0, 0.3)  # far from the 1e-4 start, so every term matters
    query = torch.randn(batch, kv_heads, groups, 1, dim)
    sparse_out = torch.randn(batch, kv_heads, groups, 1, dim)
    lse = torch.randn(batch, kv_heads, groups, 1, 1)
    evicted = (
        torch.randn(batch, kv_heads, 1, dim),
        torch.randn(batch, kv_heads, 1, dim),
        torch.tensor([1.0, 0.0])[:batch].view(batch, 1, 1).expand(batch, kv_heads, 1),
        torch.randint(1, 50, (batch, kv_heads, 1)),
    )
    state_h = torch.rand(batch, kv_heads, 4, dim)
    state_z = torch.rand(batch, kv_heads, 4)
    return kernels, query, sparse_out, lse, evicted, state_h, state_z


def _run(step, inputs, **options):
    kernels, query, out, lse, evicted, h, z = inputs
    h, z = h.clone(), z.clone()
    with torch.no_grad():
        result = step(kernels, query, out, lse, evicted, h, z, **options)
    return result, h, z


def test_the_step_is_fade_then_fold_then_read():
    inputs = _step_inputs()
    kernels, query, out, lse, (key, value, weight, distance), h, z = inputs
    got, got_h, got_z = _run(state.decode_step, inputs)
    with torch.no_grad():
        fade = torch.exp(-kernels.decay_rate())[None, :, None]  # one token: (1, Hkv, 1)
        w = weight * torch.exp(-kernels.decay_rate()[None, :, None] * distance)
        psi = kernels.psi(key) * w.unsqueeze(-1)  # (B, Hkv, 1, R)
        want_h = h * fade.unsqueeze(-1) + psi.transpose(-1, -2) @ value
        want_z = z * fade + psi[:, :, 0]
        phi = kernels.phi(query)  # (B, Hkv, G, 1, R)
        num = phi @ want_h.unsqueeze(2)
        den = phi @ want_z[:, :, None, :, None]
        want = (lse.exp() * out + num) / (lse.exp() + den)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_z, want_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_equals_eager():
    inputs = _step_inputs()
    step = state.Compiled(state.decode_step)
    eager = _run(step, inputs, enabled=False)
    compiled = _run(step, inputs)
    assert not step.failed and step.compile_seconds > 0
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    seconds = step.compile_seconds
    _run(step, inputs)  # same shapes: nothing new is compiled or counted
    assert step.compile_seconds == seconds


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **_):
        def call(*args):
            raise RuntimeError("no C++ compiler found")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    inputs = _step_inputs()
    step = state.Compiled(state.decode_step)
    with pytest.warns(RuntimeWarning, match="could not compile its decoding step"):
        result = _run(step, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call stays quiet
        again = _run(step, inputs)
    eager = _run(state.decode_step, inputs)
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
        from test_state import _step_inputs, _run
        from lesskv.core import state
        inputs = _step_inputs()
        got = _run(state.compiled_decode_step, inputs)
        want = _run(state.decode_step, inputs)
        assert state.compiled_decode_step.failed
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
