"""fusedbn against torch's nn.BatchNorm1d/2d/3d of the input's rank (and, with --compare eager,compile,
torch.compile'd): is it faster, by how much, is that beyond the noise, and how close to the hardware limit.

    python benchmarks/bench.py --quick                       # a few shapes, short runs (make bench)
    python benchmarks/bench.py --device cpu --batch 8 --json out.json --plot out.png
    python benchmarks/bench.py --device cpu --shapes unet3d --layout both   # a 3-D UNet's BatchNorm3d, N=2
    python benchmarks/bench.py --device cuda --dtype bfloat16,float32 --compare eager,compile

Every contender runs on the same tensors, interleaved in rounds with the best round kept; times are medians
from torch.utils.benchmark, and each row's verdict says whether fusedbn's range of round times is clear of
torch's (faster, slower) or overlaps it (tie). Outputs and gradients are first checked against torch's
module (--no-check skips that). The roofline counts the passes over the tensor each mode cannot avoid
(training forward 3, eval 2, training forward+backward 8) at the bandwidth of a plain copy measured in the
same run.
"""
import argparse
import sys
from pathlib import Path

import torch

import bench_lib
import report
from bench_lib import (ANCHORS, COPY_PASSES, DEFAULT_WORKLOADS, LAYOUTS, MODES, OURS, PRESET_BATCH, WORKLOADS,
                       Setup)

DTYPES = ("float32", "float64", "float16", "bfloat16")


def _choices(allowed, all_name):
    """A comma-separated list from `allowed`, or `all_name` for all of them."""
    def parse(text):
        items = list(allowed) if text == all_name else [t.strip() for t in text.split(",")]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)} or {all_name}")
        return items
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", help="a preset (resnet50, small: ResNet-50's BatchNorm2d shapes at --batch; "
                        "unet3d: a 3-D UNet's BatchNorm3d shapes, C 16-128 at 32^3 to 4^3, at --batch, default 2; "
                        "anchors: published anchors' 3-D, 4-D and 5-D shapes, run them in float16) or explicit "
                        "shapes 'N,C,H,W;N,C,D,H,W;...' (N,C or N,C,L: BatchNorm1d; N,C,H,W: 2d; N,C,D,H,W: 3d) "
                        "(default: resnet50, small with --quick)")
    parser.add_argument("--batch", type=int, help="N of the presets (default: 256 on cuda, 8 on cpu; unet3d: 2)")
    parser.add_argument("--dtype", type=_choices(DTYPES, "all"), default=["float32"],
                        help="input dtype(s), comma-separated (default: float32)")
    parser.add_argument("--param-dtype", choices=DTYPES, default="float32",
                        help="weight, bias and running statistics (default float32; float64 input uses float64)")
    parser.add_argument("--layout", choices=["nchw", "nhwc", "both"], default="both",
                        help="nhwc: channels-last (channels_last_3d for 5-D inputs; 2-D and 3-D inputs have none "
                        "and run nchw only); default both")
    parser.add_argument("--mode", type=_choices(MODES, "all"), default=list(MODES),
                        help=f"{', '.join(MODES)}, comma-separated, or all (default)")
    parser.add_argument("--workload", type=_choices(list(WORKLOADS), "all"), default=DEFAULT_WORKLOADS,
                        help="what follows BatchNorm: bn (nothing), bn+relu, bn+add+relu (a residual added, "
                        "then relu), bn+relu6, bn+leaky_relu, bn+elu, bn+silu, bn+hardswish, bn+gelu, bn+gelu_tanh, "
                        "bn+prelu (a weight per channel), bn+add+silu, bn+add+prelu; comma-separated, or all "
                        "(default: bn, bn+relu, bn+add+relu)")
    parser.add_argument("--compare", type=_choices(list(ANCHORS), "all"), default=["eager"],
                        help="anchors: eager (always) and compile (torch.compile, slow to compile on CPU)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="verify outputs, gradients and running statistics against torch's module first")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--distributed", type=int, metavar="N",
                        help="instead of the sweep: a training step of FusedSyncBatchNorm in N gloo processes "
                        "(CPU), each on a batch of the given shape, against nn.BatchNorm2d alone in each")
    parser.add_argument("--quick", action="store_true", help="the small preset and short runs")
    parser.add_argument("--full-table", metavar="PATH",
                        help="write the full table to PATH and print a summary line per row instead (make bench)")
    parser.add_argument("--min-run-time", type=float, help="seconds per measurement, all rounds together "
                        "(default 0.5, 0.05 with --quick)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds, best kept (default 3, 2 with --quick)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay each measured call from a CUDA graph: the kernels' time without the host's "
                        "launch overhead (compare with a run without it)")
    parser.add_argument("--json", help="write the header and rows as JSON (rewritten as each shape lands)")
    parser.add_argument("--csv", help="write the rows as CSV")
    parser.add_argument("--plot", help="write the speedup figure (PNG)")
    args = parser.parse_args(argv)

    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    args.shapes = args.shapes or ("small" if args.quick else "resnet50")
    if args.batch is None:
        args.batch = PRESET_BATCH.get(args.shapes, 256 if args.device == "cuda" else 8)
    try:
        args.shapes = bench_lib.parse_shapes(args.shapes, args.batch)
    except ValueError as error:
        parser.error(f"--shapes: {error}")
    if args.distributed and any(len(shape) != 4 for shape in args.shapes):
        parser.error("--distributed times BatchNorm2d: N,C,H,W shapes only")
    args.layouts = list(LAYOUTS) if args.layout == "both" else [args.layout.upper()]
    args.anchors = [ANCHORS[name] for name in ANCHORS if name == "eager" or name in args.compare]
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.5)
    args.rounds = args.rounds or (2 if args.quick else 3)
    return args


def setups(args):
    """Every (workload, shape, layout, dtype) of the sweep, each one set of rows."""
    for workload in args.workload:
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            param_dtype = dtype if dtype == torch.float64 else getattr(torch, args.param_dtype)
            for shape in args.shapes:
                for layout in args.layouts:
                    if layout == "NHWC" and len(shape) not in bench_lib.CHANNELS_LAST:
                        continue  # 2-D and 3-D inputs have no channels-last format
                    yield Setup(tuple(shape), layout, dtype, param_dtype, args.device, WORKLOADS[workload])


class Progress:
    """A rich progress bar on a terminal; nothing when stdout is piped."""

    def __init__(self, total):
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(transient=True)
            self.task = self.bar.add_task("", total=total)

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def step(self, description, advance=1):
        if self.bar:
            self.bar.update(self.task, description=description, advance=advance)


def run_distributed(args):
    import distributed

    setups = [(shape, layout, getattr(torch, dtype)) for dtype in args.dtype for shape in args.shapes
              for layout in args.layouts]
    rows = distributed.run(args.distributed, setups)
    env = bench_lib.environment("cpu")
    print(f"FusedSyncBatchNorm, {args.distributed} gloo processes on {env['machine']} (one thread each); "
          f"torch {env['torch']}, fusedbn {env['fusedbn']}; training step (forward + backward), median of "
          "fixed-count timings")
    print("\n".join(distributed.table(rows)))
    if args.json:
        report.write_json(args.json, dict(env, distributed=args.distributed), rows)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.distributed:
        return run_distributed(args)
    meta = dict(bench_lib.environment(args.device), passes={w: WORKLOADS[w].passes for w in args.workload},
                copy_passes=COPY_PASSES, unsteady_copy=bench_lib.UNSTEADY_COPY,
                anchors=[a.name for a in args.anchors], ours=[o.name for o in OURS],
                contenders={c.name: c.describe(args.shapes) for c in args.anchors + OURS},
                argv=sys.argv[1:] if argv is None else list(argv))
    print("\n".join(report.header_lines(meta)), flush=True)
    todo = list(setups(args))
    rows = []
    with Progress(len(todo) * len(args.mode)) as progress:
        for setup in todo:
            progress.step(f"{setup.describe()}: setting up", advance=0)
            x, grad, residual = setup.make_tensors()
            modules = bench_lib.build_modules(setup, args.anchors + OURS, residual)
            mismatches = (bench_lib.check(setup, modules, x, grad, residual, ANCHORS["eager"].name) if args.check
                          else [])
            if mismatches:
                print("\n".join(["--check failed:"] + mismatches), file=sys.stderr)
                return 1
            for mode in args.mode:
                progress.step(f"{setup.describe()} {mode}", advance=0)
                peak = ({name: bench_lib.training_step_peak_bytes(module, x, grad, residual)
                         for name, module in modules.items()} if mode == "train-fwd-bwd" else None)
                rows.append(bench_lib.measure(setup, modules, args.anchors, OURS, x, grad, residual, mode,
                                              args.min_run_time, args.rounds, peak, args.cuda_graph))
                progress.step(f"{setup.describe()} {mode}")
            if args.json:  # after every shape, so that a run cut short keeps what it measured
                report.write_json(args.json, meta, rows)
    print()
    if args.full_table:
        Path(args.full_table).write_text("\n".join(report.header_lines(meta) + [""] + report.plain_table(rows, meta))
                                         + "\n")
        print("\n".join(report.summary_lines(rows, meta) + [f"(full table: {args.full_table})"]))
    else:
        report.print_table(rows, meta)
    if args.csv:
        report.write_csv(args.csv, rows)
    if args.plot:
        report.plot(args.plot, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
