"""Ioffe & Szegedy (2015): BatchNorm lets a network train at much higher learning rates. Test accuracy
after a fixed budget of plain-SGD epochs, over a log-spaced learning-rate sweep, with fusedbn's BatchNorm,
torch's and none; a learning rate "trains" when the test accuracy reaches --threshold. Prints each
normalisation's range of learning rates that train and how much wider BatchNorm's is.

    python examples/lr_sweep.py                                  # CNN on digits, lr 0.001 .. 100
    python examples/lr_sweep.py --model mlp --lrs 0.01:1000:11 --epochs 10
"""
import argparse
import math
import sys
import time

import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--lrs", default="0.001:100:21",
                        help="LOW:HIGH:COUNT, COUNT learning rates log-spaced from LOW to HIGH (default 0.001:100:21)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threshold", type=float, default=0.9, help="test accuracy that counts as trained")
    parser.add_argument("--norm", type=common.names(common.NORMS), default=",".join(common.NORMS),
                        help="comma-separated: fusedbn, torch, none")
    args = parser.parse_args(argv)
    low, high, count = args.lrs.split(":")
    low, high, count = math.log10(float(low)), math.log10(float(high)), int(count)
    args.lr_values = [10 ** (low + (high - low) * i / max(count - 1, 1)) for i in range(count)]
    return args


def trained_range(accuracies, lrs, threshold):
    """(lowest, highest) learning rate whose accuracy reaches the threshold, or None."""
    good = [lr for lr, accuracy in zip(lrs, accuracies) if accuracy >= threshold]
    return (min(good), max(good)) if good else None


def figure(results, args):
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        style = dict(linestyle="--") if name == "torch" else {}
        axis.plot(args.lr_values, [100 * a for a in result["test_accuracy"]], marker="o", label=name, **style)
        if result["range"] and name != "torch":
            axis.axvspan(*result["range"], alpha=0.12, color=axis.lines[-1].get_color())
    axis.axhline(100 * args.threshold, color="grey", linewidth=0.8, linestyle=":")
    axis.set(xscale="log", xlabel="learning rate (plain SGD)", ylabel=f"test accuracy after {args.epochs} epochs (%)",
             title=f"{args.model} on {args.data}: learning rates that train (shaded: accuracy >= "
                   f"{100 * args.threshold:.0f}%)")
    axis.grid(alpha=0.3)
    axis.legend()
    return fig


def main(argv=None):
    args = parse_args(argv)
    data = common.setup(args)
    started = time.perf_counter()
    print(f"{args.model} on {args.data}, {args.epochs} epochs of SGD, batch {args.batch_size}, seed {args.seed}, "
          f"{args.dtype}, {common.machine(args.device)}")
    results = {}
    with common.Progress(len(args.norm) * len(args.lr_values), "sweep") as progress:
        for norm in args.norm:
            result = results[norm] = {"test_accuracy": [], "diverged": [], "loss": []}
            for lr in args.lr_values:
                model = common.build(args.model, norm, data, args.seed)
                history = common.train(model, data, lr, args.epochs, args.batch_size, args.seed)
                accuracy = 0.0 if history["diverged"] else history["test_accuracy"][-1]
                result["test_accuracy"].append(accuracy)
                result["diverged"].append(history["diverged"])
                result["loss"].append(history["loss"])
                progress.advance(f"{norm} lr {lr:.3g}")
                progress.print(f"{norm:8} lr {lr:9.4g}  test {100 * accuracy:5.1f}%"
                               f"{'  (diverged)' if history['diverged'] else ''}")
            result["range"] = trained_range(result["test_accuracy"], args.lr_values, args.threshold)
            span = result["range"]
            result["width"] = span[1] / span[0] if span else 0.0
            where = f"[{span[0]:.3g}, {span[1]:.3g}], {result['width']:.3g}x" if span else "no learning rate"
            progress.print(f"{norm:8} trains (test >= {100 * args.threshold:.0f}%) for lr in {where}")
    if "none" in results and results["none"]["width"] and "fusedbn" in results:
        print(f"BatchNorm's range is {results['fusedbn']['width'] / results['none']['width']:.3g}x as wide as "
              "without normalisation")
    differences = None
    if {"fusedbn", "torch"} <= set(results):
        # Per learning rate: agreement to rounding where SGD is stable; where it is chaotic (near the top of
        # the range that trains and above) any rounding difference grows to the size of the loss.
        differences = [common.largest_loss_difference({name: {"loss": results[name]["loss"][i]} for name in results})
                       for i in range(len(args.lr_values))]
        print("largest |fusedbn - torch| training loss, by learning rate: " + ", ".join(
            f"{lr:.3g}: {difference:.1e}" for lr, difference in zip(args.lr_values, differences)))
    for result in results.values():
        del result["loss"]
    payload = {"learning_rates": args.lr_values, "results": results, "loss_difference_by_lr": differences}
    common.save(f"lr_sweep-{args.model}-{args.data}", args, payload, figure(results, args), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
