"""Whole models as users run them: torchvision classifiers and a 3-D segmentation UNet (MONAI's, `unet3d`)
on synthetic float32 data, the training step (forward, cross-entropy, per voxel for the UNet, backward, SGD
step) and inference (eval mode, no_grad), eager and under torch.compile (inductor), with torch's BatchNorm
against fusedbn.convert_model and fusedbn.fuse_model of the same network, at each thread count. The three
run interleaved in one process, on the same batch (bench_lib.interleaved_medians: rounds a, b, c, a, b, c,
..., best round kept); each row's verdicts say whether convert's and fuse's ranges of round times are clear
of torch's (faster, slower) or overlap it (tie).

    python benchmarks/models.py                                     # the issue's set: tens of minutes on CPU
    python benchmarks/models.py --models mobilenet_v2 --inputs 8x224 --threads all --compile eager
    python benchmarks/models.py --models unet3d --inputs 2x32 --channels-last --compile eager
    python benchmarks/models.py --json benchmarks/results/cpu/models.json

Under torch.compile, each thread count compiles afresh (torch._dynamo.reset): inductor's CPU code fixes
its OpenMP thread count when it is generated.
"""
import argparse
import copy
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn

import bench_lib
import fusedbn
from report import VERDICT_LEGEND, aligned, verdict_of

VARIANTS = ("torch", "convert", "fuse")
TASKS = ("train", "infer")
COMPILE_MODES = ("eager", "compile")
UNET3D_CLASSES = 2


@dataclass(frozen=True)
class Network:
    """A benchmarked model: `build()` makes it (seeded by the caller), `example(batch, size, generator)` its
    input and cross-entropy targets, `channels_last` the memory format --channels-last puts both in, and
    `default_inputs` the (batch, size) pairs run without --inputs."""
    build: Callable[[], nn.Module]
    example: Callable[[int, int, torch.Generator], tuple]
    channels_last: torch.memory_format
    default_inputs: tuple


def _images(batch, size, generator):
    """ImageNet-like: RGB images of size x size and a class of 1000 per image."""
    return (torch.randn(batch, 3, size, size, generator=generator),
            torch.randint(0, 1000, (batch,), generator=generator))


def _volumes(batch, side, generator):
    """One-channel cubes of side^3 voxels and a class per voxel (N, D, H, W), as segmentation trains."""
    return (torch.randn(batch, 1, side, side, side, generator=generator),
            torch.randint(0, UNET3D_CLASSES, (batch, side, side, side), generator=generator))


def _monai_unet3d():
    """MONAI's 3-D UNet with BatchNorm: residual units of conv, BatchNorm3d, Dropout(0) and PReLU."""
    from monai.networks.nets import UNet  # optional: only this model needs MONAI (parse_args checks for it)

    return UNet(spatial_dims=3, in_channels=1, out_channels=UNET3D_CLASSES, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=2, norm="batch")


UNET3D = Network(_monai_unet3d, _volumes, torch.channels_last_3d, ((2, 32), (2, 64)))


def network(name):
    """`unet3d`, or a torchvision.models constructor's name (a classifier on ImageNet-like images)."""
    if name == "unet3d":
        return UNET3D
    return Network(lambda: getattr(torchvision.models, name)(weights=None), _images, torch.channels_last,
                   ((8, 224), (32, 64)))


def _list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def _inputs(text):
    """'8x224,32x64' -> [(8, 224), (32, 64)]: batch x image size (unet3d: batch x the cube's side)."""
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
                        help="torchvision.models constructors, or unet3d (MONAI's 3-D UNet, channels 16-128, "
                        "batch norm; needs monai), comma-separated (default: resnet50,mobilenet_v2)")
    parser.add_argument("--inputs", type=_inputs,
                        help="BATCHxSIZE list: batch x image size, for unet3d batch x the cube's side, 2x32 -> "
                        "(2, 1, 32, 32, 32) (default: 8x224,32x64; unet3d 2x32,2x64)")
    parser.add_argument("--tasks", type=_subset(TASKS), default=list(TASKS), help="train, infer (default both)")
    parser.add_argument("--compile", type=_subset(COMPILE_MODES), default=list(COMPILE_MODES),
                        help="eager, compile (default both)")
    parser.add_argument("--threads", type=_threads, default=_threads("1,all"),
                        help="thread counts, 'all' = one per core (default: 1,all)")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and input in NHWC memory (channels_last_3d for unet3d)")
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds per timing, all rounds together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the header and rows as JSON (rewritten as each row lands)")
    args = parser.parse_args(argv)
    if "unet3d" in args.models and importlib.util.find_spec("monai") is None:
        parser.error("--models unet3d needs MONAI (pip install monai)")
    return args


def build_variants(net, fmt):
    """torch's network, its convert_model copy and its fuse_model copy, from the same initial weights."""
    torch.manual_seed(0)
    original = net.build().to(memory_format=fmt)
    report = fusedbn.Report()
    fused = fusedbn.fuse_model(copy.deepcopy(original), report=report)
    return {"torch": original, "convert": fusedbn.convert_model(copy.deepcopy(original)),
            "fuse": fused.to(memory_format=fmt)}, report


def make_task(task, model, images, labels):
    """A callable running one training step or one inference of `model` (a compiled one or not); the loss
    is the cross-entropy of the output's channel 1 (classes) against `labels`: per image or per voxel."""
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


def measured_row(times, spreads, first_call, **key):
    """A row of the JSON: `key` (model, input, ...), each variant's time and spread, convert's and fuse's
    time over torch's with their verdicts, the largest spread and the first calls' seconds."""
    row = dict(key, **{f"{v}_s": t for v, t in zip(VARIANTS, times)},
               **{f"{v}_spread": s for v, s in zip(VARIANTS, spreads)})
    for variant in VARIANTS[1:]:
        row[f"{variant}_over_torch"] = row[f"{variant}_s"] / row["torch_s"]
        row[f"{variant}_vs_torch"] = verdict_of(row, variant, "torch")
    return dict(row, spread=max(spreads), first_call_s=first_call)


def table_line(row):
    """The text table's cells of a row, in the header's order."""
    return [row["model"], f"{row['batch']}x{row['image_size']}", str(row["threads"]), row["mode"], row["task"],
            *(f"{row[f'{v}_s'] * 1e3:.1f}" for v in VARIANTS),
            *(f"{row[f'{v}_over_torch']:.3f}" for v in VARIANTS[1:]), *(row[f"{v}_vs_torch"] for v in VARIANTS[1:]),
            f"{100 * row['spread']:.0f}", "/".join(f"{s:.1f}" for s in row["first_call_s"])]


def main(argv=None):
    args = parse_args(argv)
    env = bench_lib.environment("cpu")
    env.update(threads=args.threads, layout="NHWC" if args.channels_last else "NCHW")
    print(f"whole models on {env['machine']} (cpu, {env['backend']}); torch {env['torch']}, fusedbn {env['fusedbn']}; "
          f"float32, {env['layout']}; training step = forward, cross-entropy (per voxel for unet3d), backward, SGD "
          "(momentum 0.9); inference = eval mode under no_grad; compile = torch.compile(model, dynamic=False) "
          "(inductor); input = batch x image size (unet3d: batch x the cube's side, one channel)")
    print("ms = median of the best of interleaved rounds; convert/torch and fuse/torch = time over time "
          "(< 1: fusedbn faster); convert vs torch and fuse vs torch = verdicts (ours: convert, fuse; the anchor: "
          f"torch): each one's rounds give a range of times, best to slowest; {VERDICT_LEGEND}; spread % = the "
          "slowest round over the best, largest of the three; first s = the first call, compilation included "
          "(torch, convert, fuse)\n")
    header = ["model", "input", "threads", "mode", "task", *(f"{v} ms" for v in VARIANTS),
              "convert/torch", "fuse/torch", "convert vs torch", "fuse vs torch", "spread %", "first s"]
    table, rows = [header], []
    for name in args.models:
        net = network(name)
        fmt = net.channels_last if args.channels_last else torch.contiguous_format
        variants, report = build_variants(net, fmt)
        print(f"{name}: fuse_model {report}")
        for batch, size in args.inputs or net.default_inputs:
            images, labels = net.example(batch, size, torch.Generator().manual_seed(1))
            images = images.to(memory_format=fmt)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for mode in args.compile:
                    torch._dynamo.reset()
                    for task in args.tasks:
                        row = measured_row(*measure(variants, task, mode == "compile", images, labels, args),
                                           model=name, batch=batch, image_size=size, threads=threads, mode=mode,
                                           task=task)
                        rows.append(row)
                        table.append(table_line(row))
                        print(aligned(table)[-1] if len(table) > 2 else "\n".join(aligned(table)), flush=True)
                        if args.json:
                            with open(args.json, "w") as f:
                                json.dump(dict(environment=env, rows=rows), f, indent=1)
    print("\n" + "\n".join(aligned(table)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
