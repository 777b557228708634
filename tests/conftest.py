"""Shared fixtures: the devices every equivalence test runs on (the accuracy oracle is in helpers.py)."""
import dataclasses
import importlib.util
import os
import random

import pytest
import torch

import fusedbn
from helpers import route_ops

HAS_SIMT = importlib.util.find_spec("fusedbn._simt") is not None
if HAS_SIMT:
    import fusedbn._simt  # noqa: F401  (registers torch.ops.fusedbn_simt)
    from fusedbn._op_autograd import register_autograd_kernels

    register_autograd_kernels("fusedbn_simt")  # the ops' autograd, as fusedbn's own have it

# The emulator runs a launch's blocks in a random order (csrc/simt/simt.h), different in every run of the
# suite unless FUSEDBN_SIMT_SEED is set: each test on the simt device starts from this seed, so setting it to
# the value a failure (or the header) reports replays that test's block orders.
SIMT_SEED = int(os.environ["FUSEDBN_SIMT_SEED"], 0) if os.environ.get("FUSEDBN_SIMT_SEED") else random.randrange(2**32)


def pytest_report_header(config):
    if HAS_SIMT:
        return (f"simt: blocks in random order from FUSEDBN_SIMT_SEED={SIMT_SEED}, "
                f"{fusedbn._simt.concurrent_blocks()} at once, sanitizer {'on' if fusedbn._simt.sanitize() else 'off'}")

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

@dataclasses.dataclass(frozen=True)
class Backend:
    """Where a test runs: ``name`` (the DEVICES id), ``device`` (the tensors' device: "cpu" for the emulator,
    whose kernels take CPU tensors) and ``ops_library`` (the torch.ops namespace fusedbn.ops is routed to)."""

    name: str
    device: str
    ops_library: str


@pytest.fixture(params=DEVICES)
def backend(request, monkeypatch):
    if request.param == "simt":
        route_ops("fusedbn_simt", monkeypatch.setattr)
        fusedbn._simt.set_seed(SIMT_SEED)
        yield Backend("simt", "cpu", "fusedbn_simt")
        # The debug hook of the arrival counters: every grid merge's last block reset its counter.
        assert fusedbn._simt.nonzero_arrival_counters() == [], "arrival counters left non-zero"
        return
    yield Backend(request.param, request.param, "fusedbn")


@pytest.fixture
def device(backend):
    """The tensors' device of ``backend``, for the tests that need nothing else of it."""
    return backend.device


def _too_many_blocks_to_emulate(params):
    """Channels-first input with many channels launches one block per channel, each block a set of OS
    threads under the emulator (about 20 s for C = 1000): such shapes run on cpu and cuda only. The same
    kernel paths run under the emulator with the smaller shapes."""
    shape, layout = params.get("shape"), params.get("layout", "contiguous")
    return shape is not None and shape[1] > 64 and len(shape) > 2 and layout != "channels_last"


def pytest_collection_modifyitems(config, items):
    deselected = [item for item in items
                  if hasattr(item, "callspec") and item.callspec.params.get("backend") == "simt"
                  and _too_many_blocks_to_emulate(item.callspec.params)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
