"""torch.profiler timelines of one BatchNorm2d training step (forward + backward) and one eval call, fusedbn's
and nn.BatchNorm2d's, for the kernels each launches and their device time (CUDA; on the CPU the ops).

    python benchmarks/profile_step.py --shape 256x256x56x56 --shape 256x2048x7x7 --out results/dir

Per shape and module it writes <out>/<shape>-<module>-<task>.json (a Chrome trace: chrome://tracing or
ui.perfetto.dev) and prints the profiler's table of the ops and kernels.
"""
import argparse
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fusedbn


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", action="append", help="NxCxHxW (repeatable; default 256x256x56x56 and 256x2048x7x7)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--layout", default="nhwc", choices=["nchw", "nhwc"])
    parser.add_argument("--out", required=True, help="folder for the traces")
    parser.add_argument("--rows", type=int, default=12, help="rows of each printed table")
    args = parser.parse_args(argv)
    args.shape = [tuple(int(v) for v in s.split("x")) for s in (args.shape or ["256x256x56x56", "256x2048x7x7"])]
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.layout == "nhwc" else torch.contiguous_format
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort_by = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    for shape in args.shape:
        x = torch.randn(shape, device=args.device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
        grad = torch.randn_like(x)
        modules = {"torch": nn.BatchNorm2d(shape[1]), "fusedbn": fusedbn.FusedBatchNorm2d(shape[1])}

        for name, module in modules.items():
            module.to(args.device)  # float32 parameters, as under autocast

            def train_step():
                module.train()
                module(x).backward(grad)

            def eval_call():
                module.eval()
                with torch.no_grad():
                    module(x)

            for task, fn in {"train": train_step, "eval": eval_call}.items():
                fn()  # warm-up: allocator blocks, the scratch, lazy initialisation
                if args.device == "cuda":
                    torch.cuda.synchronize()
                with profile(activities=activities) as prof:
                    fn()
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                tag = f"{'x'.join(map(str, shape))}-{name}-{task}"
                prof.export_chrome_trace(str(out / f"{tag}.json"))
                print(f"== {tag} ({args.dtype}, {args.layout})")
                print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
