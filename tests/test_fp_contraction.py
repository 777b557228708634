"""Where the formulas fuse a*b + c into one rounding (csrc/host_device.h): the exact bits each backend owes,
against an oracle that rounds the exact rational value once (fused) or rounds the product first (unfused).

- normalize's (x - mean) * alpha + beta: fused on the GPU, in the SIMT emulator and in the CPU builds with
  FMA instructions (AVX2, AVX-512, aarch64), rounded twice in the x86-64 baseline CPU build;
- the training dx's (dz - mean_dz) - (x - mean) * proj, left to the compiler: one of the two roundings on
  every backend, and the product rounded first in the emulator (compiled with -ffp-contract=off);
- the running-statistics update (1 - m) * old + m * batch: one fma on every backend, the baseline CPU build
  included.
Each test also checks that its inputs tell the two roundings apart, so a build that fused nothing (or
everything) could not pass by accident.
"""
import os
import platform
from fractions import Fraction

import numpy
import pytest
import torch

import fusedbn

F32 = numpy.float32


def _round_to_f32(exact: Fraction) -> numpy.float32:
    """exact rounded once to float32, to nearest, ties to even (float() rounds to float64 first: a candidate
    within one float32 step, then the nearest of it and its neighbours decides)."""
    guess = F32(float(exact))
    candidates = [numpy.nextafter(guess, F32(-numpy.inf)), guess, numpy.nextafter(guess, F32(numpy.inf))]
    best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), int(c.view(numpy.int32)) & 1))
    return F32(best)


def _fused(a, b, c):
    """round(a * b + c), elementwise, a b c float32 arrays of one shape."""
    flat = [_round_to_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
            for x, y, z in zip(a.ravel(), b.ravel(), c.ravel())]
    return numpy.array(flat, dtype=F32).reshape(a.shape)


def _unfused(a, b, c):
    return (a * b).astype(F32) + c  # float32 numpy arithmetic: each step correctly rounded


def _cpu_build_fuses():
    """True where the loaded CPU build has FMA instructions (host_device.h's mul_add fuses), False where it
    has not, None where this cannot be told (a FUSEDBN_CPU_ARCH build of an unknown -march)."""
    build = fusedbn.ops.cpu_build
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # aarch64, ppc64le, s390x: FMA is in the baseline instruction set
    if build in ("avx2", "avx512"):
        return True
    if build == "default":
        return False
    if os.environ.get("FUSEDBN_CPU_ARCH", "native") != "native":
        return None
    try:
        with open("/proc/cpuinfo") as f:
            return " fma " in f" {f.read()} ".replace("\n", " ")
    except OSError:
        return None


def _expected(backend, fused, unfused, got):
    """The one of the two roundings this backend owes (fused on the GPU and in the emulator)."""
    fuses = True if backend.name in ("simt", "cuda") else _cpu_build_fuses()
    if fuses is None:  # either is correct, but consistently the one or the other
        return fused if numpy.array_equal(got, fused) else unfused
    return fused if fuses else unfused


def _ops(backend):
    return getattr(torch.ops, backend.ops_library)


def _f32(gen, *shape, low=-4.0, high=4.0):
    return (torch.rand(*shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(torch.float32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_normalize_rounds_once_where_fma_is_an_instruction(backend, layout):
    """forward_eval, float32, identity: invstd = 1/sqrt(var + eps) and alpha = w * invstd are correctly
    rounded steps with no product to fuse, the same bits everywhere; the output is then
    round((x - mean) * alpha + beta) once (fused) or with the product rounded first (baseline CPU)."""
    gen = torch.Generator().manual_seed(0)
    N, C, H, W = 3, 6, 5, 7
    x = _f32(gen, N, C, H, W)
    weight, bias = _f32(gen, C, low=0.25, high=2.0), _f32(gen, C, low=-1.0, high=1.0)
    running_mean, running_var = _f32(gen, C, low=-0.5, high=0.5), _f32(gen, C, low=0.1, high=3.0)
    eps = 1e-5
    xd = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
    args = [t.to(backend.device) for t in (xd, weight, bias, running_mean, running_var)]
    got = _ops(backend).forward_eval(*args, eps).cpu().contiguous().numpy()

    invstd = F32(1) / numpy.sqrt(running_var.numpy() + F32(eps))
    alpha = (weight.numpy() * invstd).astype(F32)
    shape = (1, C, 1, 1)
    centered = (x.numpy() - running_mean.numpy().reshape(shape)).astype(F32)
    a = numpy.broadcast_to(alpha.reshape(shape), x.shape)
    b = numpy.broadcast_to(bias.numpy().reshape(shape), x.shape)
    fused, unfused = _fused(centered, a, b), _unfused(centered, a, b)
    assert (fused != unfused).sum() > 0, "the inputs do not tell the roundings apart"
    expected = _expected(backend, fused, unfused, got)
    assert numpy.array_equal(got, expected), (
        f"{(got != expected).sum()} of {got.size} values differ from the owed rounding "
        f"({'fused' if expected is fused else 'unfused'}; cpu build {fusedbn.ops.cpu_build})")


def test_training_dx_is_one_of_the_two_roundings(backend):
    """backward_elemt with given mean_dz and proj, identity, no residual: dz = dy and
    dx = round(round((dy - mean_dz) - (x - mean) * proj) * alpha), the inner step fused or not, value by value
    as the compiler chose (nvcc fuses it); the emulator, compiled not to fuse, rounds the product first."""
    gen = torch.Generator().manual_seed(1)
    N, C, L = 4, 5, 37
    dy, x = _f32(gen, N, C, L), _f32(gen, N, C, L)
    weight = _f32(gen, C, low=0.25, high=2.0)
    mean, invstd = _f32(gen, C, low=-0.5, high=0.5), _f32(gen, C, low=0.5, high=2.0)
    mean_dz, proj = _f32(gen, C, low=-0.5, high=0.5), _f32(gen, C, low=-2.0, high=2.0)
    args = [t.to(backend.device) for t in (dy, x, weight, mean, invstd, mean_dz, proj)]
    dx, _ = _ops(backend).backward_elemt(*args)
    got = dx.cpu().numpy()

    shape = (1, C, 1)
    alpha = numpy.broadcast_to((weight.numpy() * invstd.numpy()).astype(F32).reshape(shape), x.shape)
    centered_dz = (dy.numpy() - mean_dz.numpy().reshape(shape)).astype(F32)
    neg_centered = -(x.numpy() - mean.numpy().reshape(shape)).astype(F32)
    p = numpy.broadcast_to(proj.numpy().reshape(shape), x.shape)
    fused = (_fused(neg_centered, p, centered_dz) * alpha).astype(F32)
    unfused = (_unfused(neg_centered, p, centered_dz) * alpha).astype(F32)
    assert (fused != unfused).sum() > 0, "the inputs do not tell the roundings apart"
    neither = (got != fused) & (got != unfused)
    assert not neither.any(), f"{neither.sum()} of {got.size} values are neither rounding"
    if backend.name == "simt":
        assert numpy.array_equal(got, unfused), f"{(got != unfused).sum()} of {got.size} values fused"


def test_running_mean_update_is_one_fma_on_every_backend(backend):
    """forward_train's running_mean: round((1 - m) * old + round(m * batch_mean)) with m = float32(momentum),
    from the batch mean the op returns, on every backend (an explicit fma: libm's in the baseline CPU build)."""
    gen = torch.Generator().manual_seed(2)
    M, C = 6, 512
    momentum = 0.1
    x = _f32(gen, M, C, low=-3.0, high=3.0)
    old = _f32(gen, C, low=-2.0, high=2.0)
    running_mean, running_var = old.clone().to(backend.device), torch.ones(C, device=backend.device)
    _, batch_mean, _ = _ops(backend).forward_train(x.to(backend.device), None, None, running_mean, running_var,
                                                   momentum, 1e-5)
    got = running_mean.cpu().numpy()

    m = F32(momentum)
    one_minus_m = numpy.full(C, F32(1) - m, dtype=F32)
    scaled_batch = (m * batch_mean.cpu().numpy()).astype(F32)
    fused = _fused(one_minus_m, old.numpy(), scaled_batch)
    assert (fused != _unfused(one_minus_m, old.numpy(), scaled_batch)).sum() > 0, "inputs do not discriminate"
    assert numpy.array_equal(got, fused), f"{(got != fused).sum()} of {C} channels differ"
