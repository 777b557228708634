"""Shared fixtures: the devices every equivalence test runs on, and the per-dtype tolerances."""
import pytest
import torch

import fusedbn  # noqa: F401  (loads the ops)

# Where a test runs. A device joins the whole suite by being added here.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
        ],
    ),
]

# Accuracy oracle: torch computes the same thing in float64; fusedbn's largest error against that must be
# within twice torch's own largest error in the tested dtype, plus a floor for cases where torch happens to
# be exact: `atol` (a few units in the last place of the dtype near 1) and a few units in the last place at
# the result's magnitude. `rtol`/`atol` are also used
# where two results must simply agree.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
DTYPES = list(TOLERANCES)
ERROR_RATIO = 2.0


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def assert_close(actual, expected, dtype, msg=""):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"], msg=lambda m: f"{msg}\n{m}")


def assert_as_accurate(ours, theirs, exact, dtype, msg="", scale=1.0):
    """max|ours - exact| <= ERROR_RATIO * max|theirs - exact| + atol * scale, with `exact` in float64.
    `scale` is sqrt(count) for sums over `count` values (weight/bias gradients), whose rounding error
    grows with the count."""
    assert ours.dtype == theirs.dtype, f"{msg}: dtype {ours.dtype} vs {theirs.dtype}"
    if ours.numel() == 0:
        assert theirs.numel() == 0
        return
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    # Rounding the result itself to `dtype` costs up to half a unit in the last place at its magnitude.
    rounding = 4 * torch.finfo(dtype).eps * exact.abs().max().item()
    bound = ERROR_RATIO * err_theirs + TOLERANCES[dtype]["atol"] * scale + rounding
    assert err_ours <= bound, f"{msg}: fusedbn error {err_ours:.3g} > {bound:.3g} (torch's error {err_theirs:.3g})"
