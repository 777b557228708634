"""Train a small network on scikit-learn's handwritten digits (or synthetic gratings) with fusedbn's
BatchNorm, torch's nn.BatchNorm, or no normalisation, each from the same seed, and compare: accuracy per
epoch, and the largest per-step difference between the fusedbn and torch losses (the two must train alike).
That difference is set beside torch's own sensitivity to rounding: the difference between torch's run and
torch's run from weights scaled by (1 + the dtype's epsilon).

    python examples/train.py                               # CNN on digits, fusedbn, torch and none
    python examples/train.py --model mlp --lr 0.5          # Ioffe & Szegedy's sigmoid MLP with BatchNorm1d
    python examples/train.py --data gratings --norm fusedbn,torch --epochs 5 --device cuda
"""
import argparse
import sys
import time

import torch

import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--norm", type=common.names(common.NORMS), default=",".join(common.NORMS),
                        help="comma-separated normalisation layers to train with: fusedbn, torch, none")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=10)
    return parser.parse_args(argv)


def figure(runs, args):
    import matplotlib.pyplot as plt

    fig, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, run in runs.items():
        style = dict(linestyle="--") if name == "torch" else {}
        loss_axis.plot(range(1, len(run["loss"]) + 1), run["loss"], label=name, linewidth=1, **style)
        epochs = range(1, len(run["test_accuracy"]) + 1)
        accuracy_axis.plot(epochs, [100 * a for a in run["test_accuracy"]], marker="o", label=name, **style)
    loss_axis.set(xlabel="SGD step", ylabel="training loss (cross-entropy)", yscale="log",
                  title=f"{args.model} on {args.data}, lr {args.lr}")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (eval mode)")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    return fig


def rounding_floor(torch_run, data, args):
    """The largest loss difference between torch's run and the same run from weights scaled by (1 + eps):
    how far rounding alone moves these curves."""
    model = common.build(args.model, "torch", data, args.seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + torch.finfo(parameter.dtype).eps)
    perturbed = common.train(model, data, args.lr, args.epochs, args.batch_size, args.seed, args.momentum)
    return common.largest_loss_difference({"fusedbn": perturbed, "torch": torch_run})


def main(argv=None):
    args = parse_args(argv)
    data = common.setup(args)
    started = time.perf_counter()
    print(f"{args.model} on {args.data} ({len(data.train[1])} train / {len(data.test[1])} test images), SGD lr "
          f"{args.lr} momentum {args.momentum}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}, "
          f"{args.dtype}, {common.machine(args.device)}")
    runs = {}
    with common.Progress(len(args.norm) * args.epochs, "training") as progress:
        for norm in args.norm:
            def report(epoch, history, norm=norm):
                progress.advance(f"{norm} epoch {epoch + 1}")
                progress.print(f"{norm:8} epoch {epoch + 1:3}/{args.epochs}  loss {history['loss'][-1]:.4f}  "
                               f"train {100 * history['train_accuracy'][-1]:5.1f}%  "
                               f"test {100 * history['test_accuracy'][-1]:5.1f}%")

            model = common.build(args.model, norm, data, args.seed)
            runs[norm] = common.train(model, data, args.lr, args.epochs, args.batch_size, args.seed, args.momentum,
                                      progress=report)
            if runs[norm]["diverged"]:
                progress.print(f"{norm:8} diverged (loss not finite) at step {len(runs[norm]['loss'])}")
    difference = common.largest_loss_difference(runs)
    floor = None
    if difference is not None:
        print(f"largest |fusedbn - torch| training loss over {len(runs['torch']['loss'])} steps: {difference:.2e}")
        floor = rounding_floor(runs["torch"], data, args)
        print(f"largest |torch - torch from weights x (1 + eps)| over the same steps:  {floor:.2e}")
    stem = f"train-{args.model}-{args.data}" + ("" if args.dtype == "float32" else f"-{args.dtype}")
    common.save(stem, args, {"runs": runs, "largest_loss_difference": difference,
                                "torch_rounding_floor": floor},
                figure(runs, args), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
