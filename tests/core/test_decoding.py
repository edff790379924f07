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
from lesskv.core.forms import KernelShape
from lesskv.core.kernels import FORMS, make_kernels
from lesskv.core.policies import POLICIES, make_policy

SLOTS, SCALE = 7, 0.25


def _inputs(policy="h2o", less=True, seed=0, window=None):
    """A layer mid-generation: every slot filled except where ``valid`` says, the next
    token at position 20, random scores; the arguments of :func:`decoding.layer_step`."""
    kernels, query, _, _, (key, value, _, _), held = _step_inputs(seed=seed)
    b, hkv, _, _, d = query.shape
    keys, values = torch.randn(b, hkv, SLOTS, d), torch.randn(b, hkv, SLOTS, d)
    positions = torch.stack([torch.randperm(20)[:SLOTS] for _ in range(b * hkv)])
    positions = positions.view(b, hkv, SLOTS)
    valid = torch.rand(b, hkv, SLOTS) > 0.2
    valid[..., 0] = True
    slots = decoding.SlotBuffers(
        keys, values, positions, torch.rand(b, hkv, SLOTS), valid, torch.full((b,), 20)
    )
    pol = make_policy(policy, SLOTS)
    lss = (kernels, held) if less else None
    return pol, pol.split(SLOTS), window, query, key, value, slots, SCALE, lss


def _copies(inputs):
    """``inputs`` with everything a step updates in place cloned."""
    *head, slots, scale, less = inputs
    slots = decoding.SlotBuffers(*(t.clone() for t in slots))
    if less is not None:
        less = less[0], tuple(t.clone() for t in less[1])
    return (*head, slots, scale, less)


def _run(step, inputs, **options):
    """``step`` on copies: (out, lse, evicted..., buffers..., state...)."""
    inputs = _copies(inputs)
    with torch.no_grad():
        out, lse, evicted = step(*inputs, **options)
    less = inputs[-1]
    return (out, lse, *evicted, *inputs[6]) + (less[1] if less is not None else ())


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_step_is_insert_then_masked_softmax_then_scores_then_state(policy, window):
    inputs = _inputs(policy, window=window)
    pol, split, _, query, key, value, slots, scale, (kernels, (h, z)) = inputs
    got = _run(decoding.layer_step, inputs)
    out, lse, ev_k, ev_v, ev_pos, weight, keys, values, positions, scores, valid, seen = got[:12]
    # the reference: the lowest-priority slot, by hand
    valid_before = slots.valid.clone()
    if window is not None:
        valid_before &= slots.positions > 20 - window
    first, last = pol.eligible(20, split)
    rank = slots.scores if pol.uses_attention else slots.positions.float()
    eligible = (slots.positions >= first) & (slots.positions <= last)
    rank = rank.masked_fill(~eligible, float("inf")).masked_fill(~valid_before, float("-inf"))
    slot = rank.argmin(-1, keepdim=True)
    torch.testing.assert_close(ev_pos, slots.positions.gather(-1, slot))
    torch.testing.assert_close(weight, valid_before.gather(-1, slot).float())
    index = slot.unsqueeze(-1).expand(-1, -1, 1, key.shape[-1])
    torch.testing.assert_close(ev_k, slots.keys.gather(2, index))
    want_keys = slots.keys.clone().scatter_(2, index, key)
    want_valid = valid_before.scatter(-1, slot, True)
    assert torch.equal(keys, want_keys) and torch.equal(valid, want_valid)
    assert torch.equal(positions, slots.positions.scatter(-1, slot, 20)) and (seen == 21).all()
    logits = torch.einsum("bhgqd,bhkd->bhgqk", query, want_keys) * scale
    logits = logits.masked_fill(~want_valid[:, :, None, None, :], float("-inf"))
    probs = logits.softmax(-1)
    want_lse = logits.logsumexp(-1, keepdim=True)
    sparse = probs @ values.unsqueeze(2)
    want_scores = slots.scores.scatter(-1, slot, 0.0)
    want_scores = pol.update_scores(want_scores, probs) if pol.uses_attention else want_scores
    want_h, want_z = h.clone(), z.clone()
    pair = ev_k, ev_v, weight, 20 - ev_pos
    with torch.no_grad():
        want = state.decode_step(kernels, query, sparse, want_lse, pair, (want_h, want_z))
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(scores, want_scores)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[12], want_h)
    torch.testing.assert_close(got[13], want_z)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("less", [True, False], ids=["less", "sparse"])
def test_compiled_equals_eager(policy, less):
    inputs = _inputs(policy, less)
    step = decoding.Compiled(decoding.layer_step)
    eager = _run(step, inputs, enabled=False)
    compiled = _run(step, inputs)
    assert not step.failed and step.compile_seconds > 0
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    seconds = step.compile_seconds
    _run(step, _inputs(policy, less, seed=1))  # same shapes: nothing new compiled or counted
    assert step.compile_seconds == seconds


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_step_is_one_graph_that_writes_only_in_place(policy, window):
    """What capturing a step as a CUDA graph needs: no graph break, and every buffer keeps its
    storage. (Graph breaks are dynamo's decision: its eager backend finds them without
    compiling code.)"""
    inputs = _inputs(policy, less=True, window=window)
    torch._dynamo.reset()
    whole = torch.compile(decoding.layer_step, fullgraph=True, dynamic=True, backend="eager")
    slots = inputs[6]
    pointers = [t.data_ptr() for t in (*slots, *inputs[-1][1])]
    with torch.no_grad():
        for _ in range(3):
            whole(*inputs)
    assert [t.data_ptr() for t in (*slots, *inputs[-1][1])] == pointers
    assert (slots.real_seen == 23).all()


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_forms_step_compiles_to_one_graph_that_decodes_as_eager(form):
    """Any state form keeps the step one graph (no break: what a CUDA graph needs) whose
    compiled code gives the eager step's outputs and state."""
    *head, _ = _inputs()
    torch.manual_seed(2)
    kernels = make_kernels(KernelShape(6, 2, 16, rank=4, hidden=8, state=form)).eval()
    with torch.no_grad():
        for parameter in kernels.parameters():
            parameter.normal_(0, 0.3)
    held = tuple(torch.rand_like(t) for t in kernels.empty(2, torch.device("cpu")))
    inputs = (*head, (kernels, held))
    torch._dynamo.reset()
    whole = torch.compile(decoding.layer_step, fullgraph=True, dynamic=True, backend="eager")
    _run(whole, inputs)
    step = decoding.Compiled(decoding.layer_step)
    compiled, eager = _run(step, inputs), _run(step, inputs, enabled=False)
    assert not step.failed
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **_):
        def call(*args):
            raise RuntimeError("no C++ compiler found")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    inputs = _inputs()
    step = decoding.Compiled(decoding.layer_step)
    with pytest.warns(RuntimeWarning, match="could not compile its decoding step"):
        result = _run(step, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call stays quiet
        again = _run(step, inputs)
    eager = _run(decoding.layer_step, inputs)
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
        got = _run(decoding.compiled_layer_step, inputs)
        want = _run(decoding.layer_step, inputs)
        assert decoding.compiled_layer_step.failed
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
