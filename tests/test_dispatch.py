"""Autograd records a node only where something will differentiate the call (fusedbn/_functions.py), and the Python
autograd.Functions are applied only where the C++ eager one cannot serve (torch.func, forward-mode AD, tracing):
inference and first-order backward run the ops alone, and still give torch's results."""
import pytest
import torch
import torch.nn.functional as F

import fusedbn
from fusedbn import _functions


def _refuse(*args, **kwargs):
    raise AssertionError("the autograd.Function was applied")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_function_where_nothing_needs_gradients(device, training, monkeypatch):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device)
    w = torch.rand(3, dtype=torch.float64, device=device, requires_grad=True)
    stats = (torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device))
    expected = F.batch_norm(x, *[s.clone() for s in stats], w.detach(), None, training=training)
    for name in ("TrainingFunction", "EvalFunction", "TrainingFunctionWithJvp", "EvalFunctionWithJvp"):
        monkeypatch.setattr(getattr(_functions, name), "apply", _refuse)
    with torch.no_grad():
        actual = fusedbn.batch_norm(x, *[s.clone() for s in stats], w, None, training=training)
    torch.testing.assert_close(actual, expected)
    assert actual.grad_fn is None
    actual = fusedbn.batch_norm(x, *[s.clone() for s in stats], w.detach(), None, training=training)
    torch.testing.assert_close(actual, expected)
    assert actual.grad_fn is None
    # Plain eager autograd: the C++ node (csrc/autograd.cpp), and the weight's gradient through it.
    actual = fusedbn.batch_norm(x, *[s.clone() for s in stats], w, None, training=training)
    assert actual.grad_fn is not None
    grad = torch.randn_like(actual)
    w_ref = w.detach().clone().requires_grad_()
    expected = F.batch_norm(x, *[s.clone() for s in stats], w_ref, None, training=training)
    torch.testing.assert_close(torch.autograd.grad(actual, w, grad), torch.autograd.grad(expected, w_ref, grad))


def test_backward_function_only_for_gradients_of_gradients(device, monkeypatch):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    y = fusedbn.batch_norm(x, None, None, training=True)
    for function in (_functions.BackwardFunction, _functions.BackwardFunctionEager):
        monkeypatch.setattr(function, "apply", _refuse)
    (first,) = torch.autograd.grad(y.sin().sum(), x, retain_graph=True)
    (expected,) = torch.autograd.grad(F.batch_norm(x, None, None, training=True).sin().sum(), x)
    torch.testing.assert_close(first, expected)
    with pytest.raises(AssertionError, match="was applied"):
        torch.autograd.grad(y.sin().sum(), x, create_graph=True)
