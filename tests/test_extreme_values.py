"""Statistics at the edges of the floating-point range, and over long or many-part channels, against float64
math: fusedbn must stay finite where the true result is, and be at least as accurate as torch."""
import pytest
import torch
import torch.nn.functional as F

import fusedbn
from helpers import assert_as_accurate


def _training_step(fn, x, weight, bias, upstream):
    """(output, grad_input, grad_weight, grad_bias, running_mean, running_var) of one training step."""
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    running_mean = torch.zeros(x.shape[1], dtype=weight.dtype, device=x.device)
    running_var = torch.ones(x.shape[1], dtype=weight.dtype, device=x.device)
    y = fn(x, running_mean, running_var, weight, bias, training=True)
    y.backward(upstream)
    return y, x.grad, weight.grad, bias.grad, running_mean, running_var


def _batch_norm_in_float64(input, running_mean, running_var, weight, bias, training=True, momentum=0.1, eps=1e-5):
    """Training-mode batch norm written out in float64 ops, F.batch_norm's signature: the oracle. torch's
    own float64 kernel is not one at these magnitudes: at ATEN_CPU_CAPABILITY=default it computes
    x * (w * invstd) + (b - mean * w * invstd), which at |mean| = 2e19 misses the output by 0.7."""
    assert training
    dims = [d for d in range(input.dim()) if d != 1]
    shape = [1, -1] + [1] * (input.dim() - 2)
    mean = input.mean(dims, keepdim=True)
    var = (input - mean).square().mean(dims, keepdim=True)
    output = (input - mean) * torch.rsqrt(var + eps) * weight.view(shape) + bias.view(shape)
    with torch.no_grad():
        count = input.numel() // input.shape[1]
        running_mean.mul_(1 - momentum).add_(momentum * mean.flatten())
        running_var.mul_(1 - momentum).add_(momentum * var.flatten() * count / (count - 1))
    return output


def _against_float64(x, dtype, device):
    gen = torch.Generator().manual_seed(1)
    weight = (torch.rand(x.shape[1], generator=gen) + 0.5).to(device)
    bias = torch.randn(x.shape[1], generator=gen).to(device)
    upstream = torch.randn(x.shape, generator=gen).to(device)
    ours = _training_step(fusedbn.batch_norm, x.to(dtype), weight, bias, upstream.to(dtype))
    theirs = _training_step(F.batch_norm, x.to(dtype), weight, bias, upstream.to(dtype))
    exact = _training_step(_batch_norm_in_float64, x.to(dtype).double(), weight.double(), bias.double(),
                           upstream.double())
    return ours, theirs, exact


NAMES = ("output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_channel_means_stay_finite_and_exact(device, dtype):
    """|mean| ~ 2e19: the first Welford merge (into an empty total) squared that mean (inf * 0 = NaN)."""
    x = torch.randn((4, 3, 5, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    x = x * torch.tensor([1.0, 1e17, 1e18], device=device).view(1, 3, 1, 1) + torch.tensor(
        [2e19, -3e19, 1e20], device=device).view(1, 3, 1, 1)
    ours, theirs, exact = _against_float64(x, dtype, device)
    for name, mine, torch_value, exact_value in zip(NAMES, ours, theirs, exact):
        assert mine.isfinite().all(), f"{name} is not finite"
        assert_as_accurate(mine, torch_value, exact_value, dtype, name, scale=10)


def test_one_value_near_float32_max_keeps_the_channel_finite(backend):
    """One value of 1e30 in a float32 channel: its M2 (~1e60) overflows float32. The CPU kernels then redo
    that channel in float64 (torch's CPU kernels accumulate there, but compute invstd in float32 and return
    0 for the whole channel); the output and gradients match float64 math. The CUDA kernels accumulate in
    float32, as torch's CUDA kernels do: the channel's invstd is 0 there, its output the bias, all finite."""
    device = backend.device
    x = torch.randn((4, 3, 5, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[1, 1, 2, 2] = 1e30
    ours, _, exact = _against_float64(x.to(device), torch.float32, device)
    y, dx, dw, db, rm, rv = ours
    for name, mine, exact_value in zip(NAMES[:4], (y, dx, dw, db), exact[:4]):
        if backend.name == "cpu":
            torch.testing.assert_close(mine.double(), exact_value, rtol=1e-4, atol=1e-4, msg=name)
        else:
            assert mine.isfinite().all(), f"{name} is not finite"
    torch.testing.assert_close(rm.double(), exact[4], rtol=1e-5, atol=1e-5)
    assert torch.isinf(rv[1]) and torch.isfinite(rv[[0, 2]]).all()  # 0.1 * 1e58 overflows float32


def _batch_mean(x):
    return fusedbn.ops.forward_train(x, None, None, None, None, 0.1, 1e-5)[1]


def test_mean_of_a_large_offset_over_many_parts(device):
    """torch.randn(512, 2, 512) + 1e4: 512 runs per channel, each a part of the CPU reduction; every part's
    mean was stored as shift + mean in float32 (ulp 1e-3 at 1e4) before the merge."""
    x = torch.randn((512, 2, 512), generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1e4
    exact = x.mean((0, 2))
    ours = _batch_mean(x.float().to(device)).double().cpu()
    theirs = torch.native_batch_norm(x.float(), None, None, None, None, True, 0.1, 1e-5)[1].double()
    assert_as_accurate(ours, theirs, exact, torch.float32, "mean")


def test_invstd_of_a_channel_of_2_to_the_26_values():
    """One channel, one run of 2^26 values (16384 cache-sized chunks) merged in a tree: a few ulp from float64
    (sequential merges into a float32 total were ~190 ulp off)."""
    x = torch.randn((1, 1, 2 ** 26), generator=torch.Generator().manual_seed(0))
    exact = x.double().var(unbiased=False).add(1e-5).rsqrt()
    invstd = fusedbn.ops.forward_train(x, None, None, None, None, 0.1, 1e-5)[2].double()
    ulp = torch.finfo(torch.float32).eps * exact
    assert ((invstd - exact).abs() / ulp).item() <= 4


def test_channels_last_and_channels_first_gradients_agree(device):
    """Small shapes, where the channels-last gradient sums were plain sequential float32 sums (a few draws in
    a hundred disagreed): over 200 draws both layouts give the same gradients within torch.testing's float32
    tolerance, as torch's do."""
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        x, upstream = (torch.randn((8, 3, 6, 6), generator=gen).to(device) for _ in range(2))
        x = x * 3 + 5
        weight = (torch.rand(3, generator=gen) + 0.5).to(device)
        grads = []
        for memory_format in (torch.contiguous_format, torch.channels_last):
            xg = x.to(memory_format=memory_format).detach().requires_grad_()
            w, b = weight.clone().requires_grad_(), torch.zeros(3, device=device).requires_grad_()
            fusedbn.batch_norm(xg, None, None, w, b, training=True).backward(upstream.to(memory_format=memory_format))
            grads.append((xg.grad, w.grad, b.grad))
        for name, first, last in zip(("grad_input", "grad_weight", "grad_bias"), *grads):
            torch.testing.assert_close(last, first, msg=f"seed {seed}: {name}")


def test_channels_last_invstd_when_the_first_rows_are_far_from_the_mean():
    """Channels-last statistics take one pass per block of rows (sums of the values and of their squares about
    a shift, the mean of the channel's first 16 rows), and redo in two passes the columns where that loses
    precision. Here channel 0's first 16 rows sit 100 standard deviations off, so every later block of it
    needs the second pass: without it invstd was 15 ulp from float64 (torch's 46), with it 0.3."""
    x = torch.randn((64, 2, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0, 0, 0, :16] += 100
    x = x.float().contiguous(memory_format=torch.channels_last)
    exact = x.double().var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    invstd = fusedbn.ops.forward_train(x, None, None, None, None, 0.1, 1e-5)[2].double()
    ulp = torch.finfo(torch.float32).eps * exact
    assert ((invstd - exact).abs() / ulp).max().item() <= 2
