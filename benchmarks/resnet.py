"""A whole network: torchvision's ResNet on synthetic data, as built against fusedbn.convert_model of a deep
copy (with --fuse: fusedbn.fuse_model, BatchNorm+ReLU and BatchNorm+Add+ReLU fused). First the loss of both over K SGD steps from the same initial weights and batches, side by side (they
must agree: exit status 1 otherwise), then the float32 training-step and inference times.

    python benchmarks/resnet.py                          # resnet50; on CPU batch 8 at 64x64
    python benchmarks/resnet.py --model resnet18 --device cuda --batch 128 --image-size 224
    python benchmarks/resnet.py --fuse
    python benchmarks/resnet.py --device cuda --batch 256 --channels-last --fuse --autocast bfloat16 --compile

The losses are compared in float64: an untrained ResNet on random labels amplifies rounding by orders of
magnitude per SGD step, so in float32 torch's own run leaves its float64 twin by about 1e-2 within two steps
and no float32 tolerance could tell a bug from rounding; in float64 the two stay within 1e-8 over 5 steps.
"""
import argparse
import copy
import functools
import sys

import torch
import torchvision
from torch import nn

import bench_lib
import fusedbn
from report import aligned


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["resnet50", "resnet18"], default="resnet50")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="default: 64 on cuda, 8 on cpu")
    parser.add_argument("--image-size", type=int, help="default: 224 on cuda, 64 on cpu")
    parser.add_argument("--channels-last", action="store_true", help="model and input in NHWC memory")
    parser.add_argument("--fuse", action="store_true", help="fusedbn.fuse_model instead of convert_model")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"],
                        help="time the models under torch.autocast to this dtype (float32 parameters, as in "
                        "mixed-precision training); the losses are compared in float64 regardless")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of torch's model")
    parser.add_argument("--steps", type=int, default=5, help="SGD steps whose losses are compared")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--tolerance", type=float, default=1e-6,
                        help="largest accepted float64 loss difference, relative to the loss (default 1e-6)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per timing, all rounds together")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch = args.batch or (64 if cuda else 8)
    args.image_size = args.image_size or (224 if cuda else 64)
    return args


def train_step(model, optimizer, images, labels, autocast=None):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None):
        loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss


def synthetic_batches(args, fmt):
    generator = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, args.image_size, args.image_size)
    return [(torch.randn(shape, generator=generator).to(args.device, memory_format=fmt),
             torch.randint(0, 1000, (args.batch,), generator=generator).to(args.device)) for _ in range(args.steps)]


def with_fusedbn(model, args):
    """A copy of `model` running fusedbn: converted, or with --fuse fused (printing what it fused)."""
    if not args.fuse:
        return fusedbn.convert_model(copy.deepcopy(model))
    report = fusedbn.Report()
    fused = fusedbn.fuse_model(copy.deepcopy(model), report=report)
    print(f"fuse_model: {report}")
    return fused


def compare_losses(original, batches, args):
    """Losses of the original and of its fusedbn copy, in float64, over the same SGD steps."""
    models = {"torch": copy.deepcopy(original).double()}
    models["fusedbn"] = with_fusedbn(models["torch"], args)
    losses = {}
    for name, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        losses[name] = [train_step(model, optimizer, x.double(), y).item() for x, y in batches]
    return losses["torch"], losses["fusedbn"]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = bench_lib.environment(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"{args.model} on {env['machine']} ({args.device}, {env['backend']}, threads: {env['threads']}); "
          f"torch {env['torch']}, fusedbn {env['fusedbn']}; batch {args.batch} at {args.image_size}x{args.image_size}, "
          f"{'NHWC' if args.channels_last else 'NCHW'}, SGD lr {args.lr} momentum 0.9"
          f"{', fused (fuse_model)' if args.fuse else ''}")

    torch.manual_seed(0)
    original = getattr(torchvision.models, args.model)(weights=None).to(args.device, memory_format=fmt)
    batches = synthetic_batches(args, fmt)
    theirs, ours = compare_losses(original, batches, args)
    differences = [abs(a - b) for a, b in zip(theirs, ours)]
    worst = max(d / max(abs(loss), 1.0) for d, loss in zip(differences, theirs))
    print(f"\nfloat64 loss over {args.steps} SGD steps from the same initial weights:")
    steps = [[str(i + 1), f"{a:.12f}", f"{b:.12f}", f"{d:.1e}"]
             for i, (a, b, d) in enumerate(zip(theirs, ours, differences))]
    print("\n".join(aligned([["step", "torch", "fusedbn", "difference"]] + steps)))
    print(f"largest difference {max(differences):.1e} ({worst:.1e} of the loss; tolerance {args.tolerance:.0e})")
    if not worst <= args.tolerance:  # also catches NaN
        print(f"losses disagree: {worst:.1e} of the loss > {args.tolerance:.0e}", file=sys.stderr)
        return 1

    models = {"torch": original, "fusedbn": with_fusedbn(original, args)}
    if args.compile:
        models["torch.compile"] = torch.compile(copy.deepcopy(original))
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for name, m in models.items()}
    images, labels = batches[0]
    autocast = getattr(torch, args.autocast) if args.autocast else None

    def infer(model):
        with torch.no_grad(), torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None):
            return model(images)

    tasks = {"training step": lambda name: train_step(models[name], optimizers[name], images, labels, autocast),
             "inference": lambda name: infer(models[name])}
    timings = []
    for task, run in tasks.items():
        for model in models.values():
            model.train(task == "training step")
        times, spreads = bench_lib.interleaved_medians([functools.partial(run, name) for name in models],
                                                       args.min_run_time, args.rounds)
        timings.append([task, *(f"{t * 1e3:.2f}" for t in times), *(f"{t / times[0]:.3f}" for t in times[1:]),
                        f"{100 * max(spreads):.0f}"])
    others = list(models)[1:]
    print(f"\n{args.autocast + ' autocast' if args.autocast else 'float32'}, median time (interleaved rounds, best "
          "kept; spread: slowest round over the best):")
    print("\n".join(aligned([["", *(f"{name} ms" for name in models), *(f"{name}/torch" for name in others),
                               "spread %"]] + timings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
