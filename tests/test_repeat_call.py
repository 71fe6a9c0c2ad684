"""The repeat-call shortcut of the linear faces (sparsekit/ops/linear.py, _RepeatCall): a call repeating a checked
(w, bias, backend) combination skips the checks and the dispatcher. Every change that could alter a check's
result or the backend must take the full path again."""

from __future__ import annotations

import pytest
import torch

import sparsekit as sk
from sparsekit.formats import BSR, CSR, NM
from sparsekit.ops import _dispatch
from sparsekit.ops._library import has_kernel

pytestmark = pytest.mark.skipif(not has_kernel("bsr_mm", "CPU"), reason="needs the C++ extension")


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(64, 96, generator=g) * (torch.rand(64, 96, generator=g) < 0.3)
    return {"bsr": (sk.ops.bsr_linear, BSR.from_dense(torch.randn(64, 96, generator=g), (16, 32))),
            "csr": (sk.ops.csr_linear, CSR.from_dense(dense)),
            "nm": (sk.ops.nm_linear, NM.from_dense(NM.prune(torch.randn(64, 96, generator=g), 2, 4), 2, 4))}


@pytest.mark.parametrize("family", ["bsr", "csr", "nm"])
def test_repeated_calls_follow_changes(family):
    fn, w = _weights()[family]
    x = torch.randn(5, 96)
    bias = torch.randn(64)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(fn(x, w, bias), x @ w.to_dense().T + bias)
        w.values = w.values * 2                                    # a new values tensor on the same object
        torch.testing.assert_close(fn(x, w, bias), x @ w.to_dense().T + bias)
        other_bias = torch.randn(64)
        torch.testing.assert_close(fn(x, w, other_bias), x @ w.to_dense().T + other_bias)
        torch.testing.assert_close(fn(x, w), x @ w.to_dense().T)
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 96\]"):
            fn(torch.randn(5, 95), w)
        with pytest.raises(TypeError, match="dtype"):
            fn(x.double(), w)


def test_repeated_call_keeps_autograd():
    fn, w = _weights()["bsr"]
    x = torch.randn(3, 96)
    fn(x, w)                                                       # remembered without autograd
    xg = x.clone().requires_grad_()
    fn(xg, w).sum().backward()
    torch.testing.assert_close(xg.grad, w.to_dense().sum(0).expand(3, -1))
    w.values.requires_grad_()
    fn(x, w).sum().backward()
    assert w.values.grad is not None


def test_forced_backend_is_not_bypassed(monkeypatch):
    fn, w = _weights()["bsr"]
    x = torch.randn(3, 96)
    fn(x, w)
    calls = []
    ref = _dispatch.BACKENDS["reference"]
    original = ref.mm
    monkeypatch.setattr(ref, "mm", lambda *a: calls.append(1) or original(*a))
    fn(x, w, backend="reference")
    fn(x, w, backend="reference")
    assert len(calls) == 2


@pytest.mark.parametrize("family", ["bsr", "csr", "nm"])
def test_formats_pickle_and_copy_after_a_remembered_call(family):
    """The remembered call holds an op handle (not picklable): pickle, torch.save and deepcopy leave it out."""
    import copy
    import io
    import pickle

    fn, w = _weights()[family]
    x = torch.randn(5, 96)
    with torch.no_grad():
        y = fn(x, w)
    assert "_repeat_call" in w.__dict__
    buf = io.BytesIO()
    torch.save(w, buf)
    buf.seek(0)
    copies = [torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(w)), copy.deepcopy(w), copy.copy(w)]
    for c in copies:
        assert type(c) is type(w) and "_repeat_call" not in c.__dict__
        c.validate()
        with torch.no_grad():
            torch.testing.assert_close(fn(x, c), y)
            torch.testing.assert_close(fn(x, c), y)       # and its own remembered call works
    assert "_repeat_call" in w.__dict__                     # the original keeps its own
