"""Shared fixtures: the devices every equivalence test runs on, and the per-dtype tolerances."""
import importlib.util
import math
import os

import pytest
import torch

import fusedbn

HAS_SIMT = importlib.util.find_spec("fusedbn._simt") is not None
if HAS_SIMT:
    import fusedbn._simt  # noqa: F401  (registers torch.ops.fusedbn_simt)
    from fusedbn._op_autograd import register_autograd_kernels

    register_autograd_kernels("fusedbn_simt")  # the ops' autograd, as fusedbn's own have it

# Where a test runs. A device joins the whole suite by being added here.
#   cpu  - the C++ CPU kernels
#   simt - the CUDA kernel source run on CPU tensors by the SIMT emulator (test-only fusedbn._simt,
#          built by `make test`); the tests see device "cpu" while fusedbn's ops are routed to it
#   cuda - the CUDA kernels on a real GPU
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "simt",
        id="simt",
        marks=[pytest.mark.simt, pytest.mark.skipif(not HAS_SIMT, reason="fusedbn._simt not built (make test builds it)")],
    ),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
        ],
    ),
]

# FUSEDBN_TEST_DEVICES=cpu,simt (ids, comma-separated) runs only those (`make test-fast`: cpu).
if os.environ.get("FUSEDBN_TEST_DEVICES"):
    DEVICES = [d for d in DEVICES if d.id in os.environ["FUSEDBN_TEST_DEVICES"].split(",")]

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
def device(request, monkeypatch):
    if request.param != "simt":
        return request.param
    for name in ("forward_train", "forward_eval", "backward", "batch_stats", "grad_sums", "backward_elemt"):
        monkeypatch.setattr(fusedbn.ops, name, getattr(torch.ops.fusedbn_simt, name))
    return "cpu"


def assert_close(actual, expected, dtype, msg=""):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"], msg=lambda m: f"{msg}\n{m}")


def assert_as_accurate(ours, theirs, exact, dtype, msg="", scale=1.0, slack=0.0):
    """max|ours - exact| <= ERROR_RATIO * max|theirs - exact| + atol * scale + slack, with `exact` in
    float64. `scale` is sqrt(count) for sums over `count` values (weight/bias gradients), whose rounding
    error grows with the count; `slack` covers terms whose exact value is ill-defined at the dtype's
    precision (a relu mask where the pre-activation rounds to either side of zero)."""
    assert ours.dtype == theirs.dtype, f"{msg}: dtype {ours.dtype} vs {theirs.dtype}"
    if ours.numel() == 0:
        assert theirs.numel() == 0
        return
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    if math.isnan(err_theirs):  # torch overflowed (e.g. float16 sums) where float64 did not: any finite error is better
        err_theirs = math.inf
    # Rounding the result itself to `dtype` costs up to half a unit in the last place at its magnitude.
    rounding = 4 * torch.finfo(dtype).eps * exact.abs().max().item()
    bound = ERROR_RATIO * err_theirs + TOLERANCES[dtype]["atol"] * scale + rounding + slack
    assert err_ours <= bound, f"{msg}: fusedbn error {err_ours:.3g} > {bound:.3g} (torch's error {err_theirs:.3g})"


def _too_many_blocks_to_emulate(params):
    """Channels-first input with many channels launches one block per channel, each block a set of OS
    threads under the emulator (about 20 s for C = 1000): such shapes run on cpu and cuda only. The same
    kernel paths run under the emulator with the smaller shapes."""
    shape, layout = params.get("shape"), params.get("layout", "contiguous")
    return shape is not None and shape[1] > 64 and len(shape) > 2 and layout != "channels_last"


def pytest_collection_modifyitems(config, items):
    deselected = [item for item in items
                  if hasattr(item, "callspec") and item.callspec.params.get("device") == "simt"
                  and _too_many_blocks_to_emulate(item.callspec.params)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
