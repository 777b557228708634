"""Whole models as users run them: torchvision networks on synthetic float32 data, the training step
(forward, cross-entropy, backward, SGD step) and inference (eval mode, no_grad), eager and under
torch.compile (inductor), with torch's BatchNorm against fusedbn.convert_model and fusedbn.fuse_model of
the same network, at each thread count. The three run interleaved in one process, on the same batch
(bench_lib.interleaved_medians: rounds a, b, c, a, b, c, ..., best round kept).

    python benchmarks/models.py                                     # the issue's set: tens of minutes on CPU
    python benchmarks/models.py --models mobilenet_v2 --inputs 8x224 --threads all --compile eager
    python benchmarks/models.py --json benchmarks/results/cpu/models.json

Under torch.compile, each thread count compiles afresh (torch._dynamo.reset): inductor's CPU code fixes
its OpenMP thread count when it is generated.
"""
import argparse
import copy
import json
import sys
import time

import torch
import torchvision
from torch import nn

import bench_lib
import fusedbn
from report import aligned

VARIANTS = ("torch", "convert", "fuse")
TASKS = ("train", "infer")
COMPILE_MODES = ("eager", "compile")


def _list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def _inputs(text):
    """'8x224,32x64' -> [(8, 224), (32, 64)]: batch x image size."""
    try:
        return [tuple(int(v) for v in item.split("x")) for item in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxSIZE[,BATCHxSIZE...]") from None


def _subset(allowed):
    def parse(text):
        items = _list(text)
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}")
        return items
    return parse


def _threads(text):
    """'1,all' -> [1, every core torch uses by default]."""
    cores = torch.get_num_threads()
    counts = [cores if t == "all" else int(t) for t in _list(text)]
    return list(dict.fromkeys(counts))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_list, default=["resnet50", "mobilenet_v2"],
                        help="torchvision.models constructors, comma-separated (default: resnet50,mobilenet_v2)")
    parser.add_argument("--inputs", type=_inputs, default=[(8, 224), (32, 64)],
                        help="BATCHxSIZE list (default: 8x224,32x64)")
    parser.add_argument("--tasks", type=_subset(TASKS), default=list(TASKS), help="train, infer (default both)")
    parser.add_argument("--compile", type=_subset(COMPILE_MODES), default=list(COMPILE_MODES),
                        help="eager, compile (default both)")
    parser.add_argument("--threads", type=_threads, default=_threads("1,all"),
                        help="thread counts, 'all' = one per core (default: 1,all)")
    parser.add_argument("--channels-last", action="store_true", help="model and input in NHWC memory")
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds per timing, all rounds together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the header and rows as JSON (rewritten as each row lands)")
    return parser.parse_args(argv)


def build_variants(name, fmt):
    """torch's network, its convert_model copy and its fuse_model copy, from the same initial weights."""
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None).to(memory_format=fmt)
    report = fusedbn.Report()
    fused = fusedbn.fuse_model(copy.deepcopy(original), report=report)
    return {"torch": original, "convert": fusedbn.convert_model(copy.deepcopy(original)),
            "fuse": fused.to(memory_format=fmt)}, report


def make_task(task, model, images, labels):
    """A callable running one training step or one inference of `model` (a compiled one or not)."""
    if task == "infer":
        def infer():
            with torch.no_grad():
                return model(images)
        return infer
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=1e-3, momentum=0.9)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss
    return train_step


def measure(variants, task, compiled, images, labels, args):
    """Per variant: (median seconds, spread) and the seconds of its first call (compilation included)."""
    runs, first_call = [], []
    for name, model in variants.items():
        model.train(task == "train")
        run = make_task(task, torch.compile(model, dynamic=False) if compiled else model, images, labels)
        start = time.perf_counter()
        run()
        first_call.append(time.perf_counter() - start)
        runs.append(run)
    times, spreads = bench_lib.interleaved_medians(runs, args.min_run_time, args.rounds)
    return times, spreads, first_call


def main(argv=None):
    args = parse_args(argv)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    env = bench_lib.environment("cpu")
    env.update(threads=args.threads, layout="NHWC" if args.channels_last else "NCHW")
    print(f"whole models on {env['machine']} (cpu, {env['backend']}); torch {env['torch']}, fusedbn {env['fusedbn']}; "
          f"float32, {env['layout']}; training step = forward, cross-entropy, backward, SGD (momentum 0.9); "
          f"inference = eval mode under no_grad; compile = torch.compile(model, dynamic=False) (inductor)")
    print("ms = median of the best of interleaved rounds; convert/torch and fuse/torch = time over time "
          "(< 1: fusedbn faster); spread % = the slowest round over the best, largest of the three; "
          "first s = the first call, compilation included (torch, convert, fuse)\n")
    header = ["model", "input", "threads", "mode", "task", *(f"{v} ms" for v in VARIANTS),
              "convert/torch", "fuse/torch", "spread %", "first s"]
    table, rows = [header], []
    for name in args.models:
        variants, report = build_variants(name, fmt)
        print(f"{name}: fuse_model {report}")
        for batch, size in args.inputs:
            generator = torch.Generator().manual_seed(1)
            images = torch.randn(batch, 3, size, size, generator=generator).to(memory_format=fmt)
            labels = torch.randint(0, 1000, (batch,), generator=generator)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for mode in args.compile:
                    torch._dynamo.reset()
                    for task in args.tasks:
                        times, spreads, first = measure(variants, task, mode == "compile", images, labels, args)
                        row = dict(model=name, batch=batch, image_size=size, threads=threads, mode=mode, task=task,
                                   **{f"{v}_s": t for v, t in zip(VARIANTS, times)},
                                   convert_over_torch=times[1] / times[0], fuse_over_torch=times[2] / times[0],
                                   spread=max(spreads), first_call_s=first)
                        rows.append(row)
                        table.append([name, f"{batch}x{size}", str(threads), mode, task,
                                      *(f"{t * 1e3:.1f}" for t in times), f"{row['convert_over_torch']:.3f}",
                                      f"{row['fuse_over_torch']:.3f}", f"{100 * row['spread']:.0f}",
                                      "/".join(f"{s:.1f}" for s in first)])
                        print(aligned(table)[-1] if len(table) > 2 else "\n".join(aligned(table)), flush=True)
                        if args.json:
                            with open(args.json, "w") as f:
                                json.dump(dict(environment=env, rows=rows), f, indent=1)
    print("\n" + "\n".join(aligned(table)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
