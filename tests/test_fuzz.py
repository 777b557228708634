"""Property-based equivalence: hypothesis draws shapes, layouts (strided views included), dtypes, module
options, value scales and train/eval sequences; every case compares outputs, gradients and buffers with
nn.BatchNorm*d against a float64 reference. Cases are derandomized (the same every run); a failing case
prints the drawn example (shape, view, strides). FUSEDBN_FUZZ_EXAMPLES scales the number (`make fuzz`)."""
import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import BATCH_NORMS, DTYPES, Trio

MODULES = {2: BATCH_NORMS[1], 3: BATCH_NORMS[1], 4: BATCH_NORMS[2], 5: BATCH_NORMS[3]}  # by the input's dims
SPATIAL = [1, 2, 3, 5, 7, 8, 11, 13]
# Cases per device: the emulated kernels run every CUDA thread as an OS thread, so they get fewer and
# smaller ones. 1000 in all per CI run on this machine.
EXAMPLES = {"cpu": 700, "simt": 300, "cuda": 700}
SCALE = float(os.environ.get("FUSEDBN_FUZZ_EXAMPLES", "1"))


@st.composite
def cases(draw, max_numel, max_channels):
    dims = draw(st.integers(2, 5))
    channels = draw(st.integers(1, max_channels))
    batch = draw(st.integers(1, 64))
    spatial = [draw(st.sampled_from(SPATIAL)) for _ in range(dims - 2)]
    while batch > 1 and batch * channels * max(1, int(torch.tensor(spatial).prod()) if spatial else 1) > max_numel:
        batch //= 2
    shape = [batch, channels, *spatial]
    dtype = draw(st.sampled_from(DTYPES))
    param_dtype = draw(st.sampled_from([dtype, torch.float32])) if dtype in (torch.float16, torch.bfloat16) else dtype
    return dict(
        shape=shape, dtype=dtype, param_dtype=param_dtype,
        view=draw(st.sampled_from(["contiguous", "channels_last", "sliced", "transposed", "expanded"])),
        affine=draw(st.booleans()), track_running_stats=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.5, None])), eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        scale=draw(st.sampled_from([1e-3, 1.0, 1e2, 1e4])), offset=draw(st.sampled_from([0.0, 3.0, -1e3])),
        steps=draw(st.lists(st.sampled_from(["train", "eval"]), min_size=1, max_size=3)),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def _view(base, view):
    """`base` (float64) as the drawn view: a dense layout, or a non-dense strided view of the same values."""
    if view == "channels_last":
        return base.movedim(1, -1).contiguous().movedim(-1, 1)
    if view == "sliced":  # every other element of a larger tensor along the last dim, skewed offset
        big = torch.zeros(*base.shape[:-1], 2 * base.shape[-1] + 1, dtype=base.dtype)
        big[..., 1::2] = base
        return big[..., 1::2]
    if view == "transposed" and base.dim() > 3:  # spatial dims swapped in memory
        return base.transpose(-1, -2).contiguous().transpose(-1, -2)
    if view == "expanded":  # the first sample broadcast over the batch (stride 0)
        return base[:1].expand(base.shape)
    return base.contiguous()


def _run_case(case, device):
    dtype, param_dtype, shape = case["dtype"], case["param_dtype"], case["shape"]
    torch_cls, fused_cls = MODULES[len(shape)]
    options = dict(eps=case["eps"], momentum=case["momentum"], affine=case["affine"],
                   track_running_stats=case["track_running_stats"])
    gen = torch.Generator().manual_seed(case["seed"])
    ref = torch_cls(shape[1], device=device, dtype=param_dtype, **options)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(shape[1], generator=gen) + 0.5)
            ref.bias.copy_(torch.randn(shape[1], generator=gen))
    ours = fused_cls(shape[1], device=device, dtype=param_dtype, **options)
    ours.load_state_dict(ref.state_dict())
    trio = Trio(ref, ours)
    for step, phase in enumerate(case["steps"]):
        if not case["track_running_stats"]:
            phase = "train"  # without running statistics eval uses batch statistics too: the same path
        if phase == "train" and shape[0] * int(torch.tensor(shape[2:]).prod()) == 1:
            if not case["track_running_stats"]:
                continue  # one value per channel is rejected in training (test_bad_input covers it)
            phase = "eval"
        trio.train(phase == "train")
        base = torch.randn(shape, generator=gen, dtype=torch.float64) * case["scale"] + case["offset"]
        x = _view(base, case["view"]).to(device=device, dtype=dtype)
        grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        # What rounding in the statistics' dtype (float32; float64 for float64 input) may cost on this data,
        # on top of twice torch's own error: torch sometimes accumulates in double on the CPU, and in
        # float64 it is the reference itself (its error counts as 0, though it has one). Values of size
        # up to |offset| + 4 scale, normalized by up to 1/sqrt(eps), over m values (log2(m) roundings).
        m = max(1, x.numel() // max(1, shape[1]))
        acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        size = abs(case["offset"]) + 4 * case["scale"]
        unit = 8 * acc_eps * max(1.0, math.log2(m))
        w_max = ref.weight.abs().max().item() if ref.affine else 1.0
        normalized = unit * size / math.sqrt(case["eps"]) * w_max
        g_max = grad.abs().max().item()
        slack = {"output": normalized, "grad_input": 4 * normalized * g_max,
                 "grad_weight": m * normalized * g_max, "grad_bias": m * unit * g_max,
                 "running_mean": unit * size, "running_var": unit * size * size}
        trio.step(x, grad, f"{case} step {step} ({phase}), strides {tuple(x.stride())}", slack=slack)


def test_fuzz_against_torch(backend):
    device, kind = backend.device, backend.name
    budget = dict(max_numel=4096, max_channels=300) if kind != "simt" else dict(max_numel=512, max_channels=64)

    ran = []

    @settings(max_examples=int(EXAMPLES[kind] * SCALE), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases(**budget))
    def check(case):
        _run_case(case, device)
        ran.append(case)

    check()
    # Every drawn case ran (hypothesis counts distinct examples; a repeat would not be a new case).
    assert len(ran) >= 0.9 * int(EXAMPLES[kind] * SCALE), len(ran)
    print(f"{kind}: {len(ran)} fuzz cases")
