"""The distributed rows of the benchmark (bench.py --distributed N): a training step (forward + backward)
of FusedSyncBatchNorm in N gloo processes on this machine, each on its own batch, against nn.BatchNorm2d
run by each process alone on the same batch (no communication); and the bytes each process sends per step.

Collectives need every process in step, so each timing is a fixed number of calls (Timer.timeit), the
same in every process, repeated and the median kept; process 0 reports.
"""
import datetime
import socket
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils import benchmark

import fusedbn


def bytes_sent_per_step(channels, world, dtype):
    """What one process puts on the wire per training step: its packed Welford moments (count, mean and
    M2 per channel, float64) for the all_gather, and sum(dy), sum(dy * (x - mean)) per channel in the
    statistics' dtype for the all_reduce (the payload; the transport's own traffic depends on gloo's
    algorithm)."""
    stats_bytes = 8 if dtype == torch.float64 else 4
    return 8 * (1 + 2 * channels) + 2 * channels * stats_bytes


def _step(module, x, grad):
    def run():
        module(x).backward(grad)
        x.grad = None
    return run


def _worker(rank, world, port, setups, calls, repeats, results):
    torch.set_num_threads(1)  # the processes share this machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        for shape, layout, dtype in setups:
            fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
            generator = torch.Generator().manual_seed(rank)
            x, grad = (torch.randn(shape, generator=generator).to(dtype=dtype, memory_format=fmt) for _ in range(2))
            x.requires_grad_(True)
            modules = {"torch alone": nn.BatchNorm2d(shape[1]),
                       "fusedbn synced": fusedbn.FusedSyncBatchNorm(shape[1])}
            times = {}
            for name, module in modules.items():
                run = _step(module, x, grad)
                run()  # warm-up
                timer = benchmark.Timer(stmt="run()", globals={"run": run})
                times[name] = statistics.median(timer.timeit(calls).mean for _ in range(repeats))
            if rank == 0:
                results.append(dict(shape=list(shape), layout=layout, dtype=str(dtype).removeprefix("torch."),
                                    world=world, torch_alone_s=times["torch alone"],
                                    fusedbn_synced_s=times["fusedbn synced"],
                                    synced_over_alone=times["fusedbn synced"] / times["torch alone"],
                                    bytes_sent=bytes_sent_per_step(shape[1], world, dtype)))
    finally:
        dist.destroy_process_group()


def run(world, setups, calls=20, repeats=3):
    """Rows for every (per-process shape, layout, dtype) in `setups`, measured in `world` processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.list()
        mp.spawn(_worker, args=(world, port, setups, calls, repeats, results), nprocs=world, join=True)
        return list(results)


def table(rows):
    from report import aligned, shape_str

    lines = [["shape per process", "layout", "dtype", "processes", "torch alone ms", "fusedbn synced ms",
              "synced/alone", "bytes sent per step"]]
    lines += [[shape_str(r["shape"]), r["layout"], r["dtype"], str(r["world"]), f"{r['torch_alone_s'] * 1e3:.3f}",
               f"{r['fusedbn_synced_s'] * 1e3:.3f}", f"{r['synced_over_alone']:.2f}", str(r["bytes_sent"])]
              for r in rows]
    return aligned(lines)
