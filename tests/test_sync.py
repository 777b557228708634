"""FusedSyncBatchNorm over torch.distributed: gloo processes on this machine (and NCCL, one process per GPU,
where there are several) against a single-process nn.BatchNorm2d over the concatenated batch."""
import copy
import datetime
import gc
import re
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedbn
from conftest import HAS_SIMT
from helpers import Trio, make_input, route_ops

pytestmark = pytest.mark.slow  # several processes each

TIMEOUT_S = 240


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, backend, ops_library, check, args):
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        if ops_library == "fusedbn_simt":
            import fusedbn._simt  # noqa: F401
            route_ops(ops_library)
        device = f"cuda:{rank}" if backend == "nccl" else "cpu"
        if backend == "nccl":
            torch.cuda.set_device(rank)
        check(rank, world, device, *args)
    finally:
        # Objects of the check left in reference cycles (DistributedDataParallel's reducer, a traceback) still
        # hold the process group: collected after destroy_process_group, at exit, they make gloo abort.
        gc.collect()
        dist.destroy_process_group()


def run_distributed(world, check, *args, backend="gloo", ops_library="fusedbn"):
    """Runs check(rank, world, device, *args) in `world` processes; fails on any process's error or after
    TIMEOUT_S seconds, never hangs."""
    context = mp.spawn(_entry, args=(world, _free_port(), backend, ops_library, check, args), nprocs=world,
                       join=False)
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
    while not context.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"distributed check did not finish within {TIMEOUT_S} s")


def _shard(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _check_matches_single_process(rank, world, device, sizes_list,
                                  dtypes=((torch.float32, torch.float32), (torch.bfloat16, torch.float32))):
    """For every split, layout and (input, parameter) dtype: outputs, input and parameter gradients and
    running stats over two training steps and an eval step equal one nn.BatchNorm2d over the whole batch
    (in float64 the oracle)."""
    for sizes in sizes_list:
        for layout in ("contiguous", "channels_last"):
            for dtype, param_dtype in dtypes:
                ref = nn.BatchNorm2d(5, device=device, dtype=param_dtype)
                with torch.no_grad():
                    ref.weight.copy_(torch.linspace(0.5, 1.5, 5))
                    ref.bias.copy_(torch.linspace(-0.5, 0.5, 5))
                ours = fusedbn.convert_sync_batchnorm(copy.deepcopy(ref))
                assert type(ours) is fusedbn.FusedSyncBatchNorm
                trio = Trio(ref, ours)
                gen = torch.Generator().manual_seed(0)
                for step, training in enumerate((True, True, False)):
                    trio.train(training)
                    shape = (sum(sizes), 5, 3, 4)
                    x = make_input(shape, layout, dtype, device, mean=step, std=1 + step, generator=gen)
                    grad = make_input(shape, "contiguous", dtype, device, generator=gen)
                    trio.step(x, grad, f"rank {rank}, sizes {sizes}, {layout}, {dtype}, step {step}",
                              part=lambda t: _shard(t, sizes, rank), parameter_grad=_summed_over_ranks)


def _summed_over_ranks(grad):
    """Each process holds its own part of a parameter's gradient; their sum is torch's."""
    total = grad.double()
    dist.all_reduce(total)
    return total.to(grad.dtype)


def _check_ddp_training(rank, world, device):
    """A few SGD steps of a small CNN with DistributedDataParallel: identical parameters on every rank,
    equal to one process training nn.BatchNorm2d on the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).to(device)
    reference = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(fusedbn.convert_sync_batchnorm(copy.deepcopy(model)))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, ddp)]
    gen = torch.Generator().manual_seed(1)
    per_rank = 4
    for _ in range(3):
        x = torch.randn(per_rank * world, 3, 6, 6, generator=gen).to(device)
        target = torch.randn(per_rank * world, 2, generator=gen).to(device)
        for model_, opt, inp, tgt in ((reference, optimizers[0], x, target),
                                      (ddp, optimizers[1], _shard(x, [per_rank] * world, rank),
                                       _shard(target, [per_rank] * world, rank))):
            opt.zero_grad()
            nn.functional.mse_loss(model_(inp), tgt).backward()
            opt.step()
    for (name, p), q in zip(reference.state_dict().items(), ddp.module.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
        gathered = [torch.empty_like(q) for _ in range(world)]
        dist.all_gather(gathered, q.contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name} differs between ranks"


OPS_LIBRARIES = [pytest.param("fusedbn", id="cpu"),
                 pytest.param("fusedbn_simt", id="simt", marks=[pytest.mark.simt, pytest.mark.skipif(
                     not HAS_SIMT, reason="fusedbn._simt not built (make test builds it)")])]


@pytest.mark.parametrize("ops_library", OPS_LIBRARIES)
def test_two_processes_even_and_uneven(ops_library):
    run_distributed(2, _check_matches_single_process, [[3, 3], [5, 1]], ops_library=ops_library)


@pytest.mark.parametrize("ops_library", OPS_LIBRARIES)
def test_three_processes_one_empty(ops_library):
    run_distributed(3, _check_matches_single_process, [[2, 3, 1], [3, 0, 2]], ops_library=ops_library)


def test_ddp_training():
    run_distributed(2, _check_ddp_training)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL tests need at least two GPUs")
def test_nccl_one_process_per_gpu():
    world = torch.cuda.device_count()
    run_distributed(world, _check_matches_single_process, [[3] * world, [2] * (world - 1) + [5]], backend="nccl")
    run_distributed(world, _check_ddp_training, backend="nccl")


def test_outside_a_process_group_is_single_device_batch_norm():
    ref, ours = nn.BatchNorm2d(3), fusedbn.FusedSyncBatchNorm(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    with pytest.raises(RuntimeError, match="Default process group has not been initialized"):
        fusedbn.sync_batch_norm(x, None, None, None, None, 0.1, 1e-5)
    explicit = fusedbn.FusedSyncBatchNorm(3, process_group=object())
    with pytest.raises(RuntimeError, match="given a process group, but the default process group has not been"):
        explicit(x)
    assert explicit.num_batches_tracked == 0


def test_convert_sync_batchnorm_keeps_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    model[1].running_mean.fill_(0.5)
    converted = fusedbn.convert_sync_batchnorm(model)
    assert type(converted[1]) is fusedbn.FusedSyncBatchNorm and type(converted[2][0]) is fusedbn.FusedSyncBatchNorm
    assert converted[1].weight is model[1].weight and torch.equal(converted[1].running_mean, model[1].running_mean)


@pytest.mark.parametrize("ops_library", OPS_LIBRARIES)
def test_half_bfloat16_float64_against_float64(ops_library):
    """Every dtype combination the single-process module takes: parameters in the input's dtype, or
    float32 for half and bfloat16 input (FusedSyncBatchNorm(C).half() once failed on mixed dtypes)."""
    dtypes = [(torch.float64, torch.float64), (torch.float16, torch.float16), (torch.float16, torch.float32),
              (torch.bfloat16, torch.bfloat16)]
    run_distributed(2, _check_matches_single_process, [[3, 2]], dtypes, ops_library=ops_library)


# Invalid arguments on some ranks: every rank must raise (none left waiting in a collective, none crashed by
# all_gather's mismatched sizes) and no rank may touch its state. A case changes, on the ranks that reject,
# the module of 3 channels or the valid input x; such a rank raises its own error, the others an error of
# the same type naming the first of them.

def _expand_running_var(m, x):
    m.running_var = m.running_var[:1].expand(3)
    return x


def _running_var_requires_grad(m, x):
    m.running_var.requires_grad_(True)
    return x


def _unchanged(m, x):
    return x


# case: {rejecting rank: (change(m, x) -> its input, exception type, its message)}
_BAD_RANKS = {
    "channels": {1: (lambda m, x: torch.cat([x, x[:, :1]], 1), RuntimeError, "weight should contain 4 elements not 3")},
    "int64": {0: (lambda m, x: x.long(), NotImplementedError, "not implemented for 'Long'")},
    "1-D": {2: (lambda m, x: x[0, 0, 0], ValueError, r"expected at least 2D input \(got 1D input\)")},
    "no channels": {1: (lambda m, x: x[:, :0], ValueError, "number of input channels should be non-zero")},
    "mixed dtype": {1: (lambda m, x: x.double(), RuntimeError, "mixed dtype")},
    "expanded running_var": {1: (_expand_running_var, RuntimeError, "running_var has elements that share one memory")},
    "running_var requires grad": {0: (_running_var_requires_grad, RuntimeError, re.escape(
        "batch_norm is not differentiable with respect to argument 'running_var'. This input cannot have "
        "requires_grad True."))},
    "two ranks": {0: (lambda m, x: x.long(), NotImplementedError, "not implemented for 'Long'"),
                  2: (lambda m, x: x[:, :2], RuntimeError, "weight should contain 2 elements not 3")},
    # One value per channel on rank 0 and none on the others: every rank sees the merged count of 1.
    "one value over the group": {r: (lambda m, x, r=r: x[:1, :, :1, :1] if r == 0 else x[:0], ValueError,
                                     "Expected more than 1 value per channel when training") for r in range(3)},
}


def _module(device):
    m = fusedbn.FusedSyncBatchNorm(3, device=device)
    with torch.no_grad():
        for i, t in enumerate((m.weight, m.bias, m.running_mean, m.running_var)):
            t.copy_(torch.linspace(0.5, 1.5, 3) + i)
    return m


def _functional_channels_differ(m, x, rank):
    """Without weight, bias or running statistics the ranks first agree on the channel count."""
    with pytest.raises(RuntimeError, match=r"different numbers of channels, \[2, 3, 2\]"):
        fusedbn.sync_batch_norm(x[:, :2 + rank % 2], None, None, None, None, 0.1, 1e-5)


def _check_rejections(rank, world, device):
    failures = []
    gc.collect()
    gc.disable()  # so that the reference cycles checked below are not collected in the meantime
    try:
        for name in [*_BAD_RANKS, "functional, channels differ"]:
            failures += _check_rejection(rank, world, device, name)
    finally:
        gc.enable()
    # No frame of fusedbn's is left in a reference cycle (a rank's own exception held in a frame of its
    # traceback): such frames hold the process group, and gloo aborted the process when the garbage
    # collector freed it after destroy_process_group.
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    cyclic = [o.f_code.co_name for o in gc.garbage
              if isinstance(o, types.FrameType) and "fusedbn" in o.f_code.co_filename]
    gc.set_debug(0)
    gc.garbage.clear()
    assert not cyclic, f"rank {rank}: frames in reference cycles: {cyclic}"
    assert not failures, "\n".join(failures)


def _check_rejection(rank, world, device, name):
    """Case `name` on this rank: a list of what went wrong (the next cases still run, which need every
    rank in step), after checking that the group is still usable and in step."""
    m = _module(device)
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(rank), device=device).requires_grad_()
    failures = []
    try:
        if name == "functional, channels differ":
            _functional_channels_differ(m, x, rank)
        else:
            bad = _BAD_RANKS[name]
            first = min(bad)
            change, expected, message = bad.get(
                rank, (_unchanged, bad[first][1], f"rank {first} of the process group rejected its input"))
            inp = change(m, x)
            before = {k: v.clone() for k, v in m.state_dict().items()}
            with pytest.raises(expected, match=message):
                m(inp)
            for k, v in m.state_dict().items():
                assert torch.equal(v, before[k]), f"{k} was written"
    except AssertionError as e:
        failures.append(f"rank {rank}, {name}: {e}")
    # A valid call on a fresh module gives every rank one state.
    fresh = _module(device)
    fresh(x).sum().backward()
    gathered = [torch.empty(3, device=device) for _ in range(world)]
    dist.all_gather(gathered, fresh.running_var)
    assert all(torch.equal(g, gathered[0]) for g in gathered) and fresh.num_batches_tracked == 1, name
    return failures


def test_invalid_arguments_on_some_ranks_raise_on_every_rank():
    run_distributed(3, _check_rejections)


def _check_accepted(rank, world, device):
    """What is valid on a rank: buffers created under inference_mode, a forward under inference_mode, a
    running_var requiring grad outside grad mode (as torch accepts), one value per channel on a rank, and
    the functional form without weight or running statistics. Each against one nn.BatchNorm over the batch."""
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 3, 2][:world]  # one value per channel on rank 0 for (N, C) input
    for label, shape in (("4-D", (sum(sizes), 3, 2, 2)), ("2-D", (sum(sizes), 3))):
        ref = nn.BatchNorm1d(3) if len(shape) == 2 else nn.BatchNorm2d(3)
        ours = fusedbn.convert_sync_batchnorm(copy.deepcopy(ref))
        with torch.inference_mode():
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(ours, name, getattr(ours, name).clone())
        buffers = [ours.running_mean, ours.running_var, ours.num_batches_tracked]
        for step in range(2):
            x = torch.randn(shape, generator=gen, dtype=torch.float64).float()
            inp = _shard(x, sizes, rank).requires_grad_()
            y = ours(inp)
            y.backward(torch.ones_like(y))
            torch.testing.assert_close(y, _shard(ref(x), sizes, rank), msg=f"{label} step {step}")
        assert all(t.is_inference() for t in buffers) and buffers[0] is ours.running_mean
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), msg=f"{label}: {name}")

        ref.running_var = ref.running_var.clone().requires_grad_(True)
        ours.running_var = ours.running_var.clone().requires_grad_(True)
        for mode in (torch.inference_mode, torch.no_grad):
            with mode():
                y = ours(_shard(x, sizes, rank))
            with torch.no_grad():
                torch.testing.assert_close(y, _shard(ref(x), sizes, rank), msg=f"{label}: {mode.__name__}")
            torch.testing.assert_close(ours.running_var, ref.running_var, msg=f"{label}: {mode.__name__}")

    x = torch.randn(sum(sizes), 4, 3, generator=gen)
    y = fusedbn.sync_batch_norm(_shard(x, sizes, rank), None, None, None, None, 0.1, 1e-5)
    torch.testing.assert_close(y, _shard(nn.functional.batch_norm(x, None, None, training=True), sizes, rank))


def test_inference_mode_buffers_and_other_valid_edge_cases():
    run_distributed(3, _check_accepted)
