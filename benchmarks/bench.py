"""fusedbn against nn.BatchNorm2d, side by side in one run, with a plain x.clone() as the memory yardstick.

    python benchmarks/bench.py                      # CPU, float32, ResNet-50 shapes at batch 32
    python benchmarks/bench.py --device cuda --batch 256 --dtype bfloat16 --json out.json

Times are medians from torch.utils.benchmark; ratios are torch's time over ours (>1: we are faster) and
each over clone (the cost of a read + a write of the tensor). "% roofline" counts the passes over the
tensor that a non-persistent implementation cannot avoid (training forward 3, eval 2, training
forward+backward 8) at the bandwidth the clone reaches (2 passes): 100 % means memory-bound at copy speed.
"""
import argparse
import json
import platform

import torch
from torch import nn
from torch.utils import benchmark

import fusedbn

# (C, H, W) of BatchNorm layers in ResNet-50, from the stem to the last stage.
RESNET50_SHAPES = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28), (256, 14, 14),
                   (1024, 14, 14), (2048, 7, 7)]
MODES = ("train fwd", "train fwd+bwd", "eval fwd")
PASSES = {"train fwd": 3, "train fwd+bwd": 8, "eval fwd": 2}


def _timed(fns, min_run_time, rounds=3):
    """Median time of each callable, measured in interleaved rounds (a, b, c, a, b, c, ...) and the best
    round kept, so a burst of load on the machine hits every contender alike and is filtered out."""
    for fn in fns:
        fn()  # warm-up (and CUDA lazy init)
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
            best[i] = min(best[i], timer.blocked_autorange(min_run_time=min_run_time / rounds).median)
    return best


def _runner(module, x, grad, mode):
    module.train(mode != "eval fwd")
    if mode == "train fwd+bwd":
        x = x.detach().requires_grad_(True)

        def run():
            module(x).backward(grad)
            x.grad = None
        return run
    return lambda: module(x)


def measure(shape, layout, dtype, param_dtype, device, min_run_time):
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt)
    grad = torch.randn_like(x)
    ref = nn.BatchNorm2d(shape[1], device=device, dtype=param_dtype)
    ours = fusedbn.FusedBatchNorm2d(shape[1], device=device, dtype=param_dtype)
    rows = []
    for mode in MODES:
        clone, t_ref, t_ours = _timed(
            [lambda: x.clone(), _runner(ref, x, grad, mode), _runner(ours, x, grad, mode)], min_run_time)
        rows.append(dict(shape=list(shape), layout=layout, dtype=str(dtype).split(".")[1],
                         param_dtype=str(param_dtype).split(".")[1], mode=mode, torch_s=t_ref, fusedbn_s=t_ours,
                         clone_s=clone, speedup=t_ref / t_ours, ours_over_clone=t_ours / clone,
                         torch_over_clone=t_ref / clone, torch_roofline=PASSES[mode] / 2 * clone / t_ref,
                         fusedbn_roofline=PASSES[mode] / 2 * clone / t_ours))
    return rows


def print_table(rows, title):
    header = ["shape", "layout", "mode", "torch ms", "fusedbn ms", "speedup", "torch/clone", "fusedbn/clone",
              "torch % roofline", "fusedbn % roofline"]
    lines = [[" x ".join(map(str, r["shape"])), r["layout"], r["mode"], f"{r['torch_s'] * 1e3:.3f}",
              f"{r['fusedbn_s'] * 1e3:.3f}", f"{r['speedup']:.2f}x", f"{r['torch_over_clone']:.2f}",
              f"{r['ours_over_clone']:.2f}", f"{100 * r['torch_roofline']:.0f}",
              f"{100 * r['fusedbn_roofline']:.0f}"] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        for line in [header] + lines:
            print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for line in lines:
        table.add_row(*line)
    Console(width=200).print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--param-dtype", default=None, help="parameter dtype (default: float32)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shapes", default="64x56x56,256x56x56,512x28x28,2048x7x7",
                        help="comma-separated CxHxW, or 'resnet50' for every ResNet-50 BatchNorm shape")
    parser.add_argument("--layouts", default="NCHW,NHWC")
    parser.add_argument("--min-run-time", type=float, default=0.6, help="seconds per measurement")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    param_dtype = getattr(torch, args.param_dtype) if args.param_dtype else torch.float32
    if dtype == torch.float64:
        param_dtype = torch.float64
    shapes = RESNET50_SHAPES if args.shapes == "resnet50" else [
        tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    rows = []
    for chw in shapes:
        for layout in args.layouts.split(","):
            for row in measure((args.batch, *chw), layout, dtype, param_dtype, args.device, args.min_run_time):
                rows.append(row)
                # One line per measurement as it lands, so a run cut short still reports what it measured.
                print(json.dumps(row), flush=True)
    title = f"fusedbn vs nn.BatchNorm2d on {machine} ({args.dtype} input, {str(param_dtype).split('.')[1]} params, torch {torch.__version__})"
    print_table(rows, title)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
