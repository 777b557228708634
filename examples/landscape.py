"""How smooth is the loss landscape that SGD walks through, with and without BatchNorm? A reproduction of
Santurkar et al. 2018, "How Does Batch Normalization Help Optimization?", section 3.1 / figure 4, together
with the noise-injection ("internal covariate shift") variant of section 2 / figure 2.

Every --every SGD steps, on the current training batch and before the update, with batch statistics (train
mode) and without touching the model or its BatchNorm running statistics, take g = grad L(w) and, for each
step size eta of --step-sizes, evaluate the loss and gradient at w - eta g. Per probed step it records

  loss landscape           min and max of L over eta in {0} and --step-sizes (how much the loss varies
                           along the step SGD is about to take);
  gradient predictiveness  min and max over eta of ||grad L(w - eta g) - grad L(w)||_2 (how far the
                           gradient at w is from the gradient a step away);
  effective beta-smooth.   max over eta of ||grad L(w - eta g) - grad L(w)|| / ||eta g|| (the gradient's
                           Lipschitz constant measured along the step).

Variants (all from the same seed, on the same batches): none (no normalisation), fusedbn (fusedbn's
BatchNorm), torch (nn.BatchNorm: must match fusedbn to float tolerance) and fusedbn+noise: fusedbn with,
after every BatchNorm, a module that in training mode shifts and rescales each activation (each channel and,
for convolutions, each position) as y = s * x + m with s ~ U(1, 1 + noise) and m ~ U(-noise, noise) drawn
anew at every SGD step: the distribution each following layer sees moves from step to step (non-zero mean,
non-unit variance), while the probes of one step all see the same draw. It is the identity in eval mode, where
the next BatchNorm's running statistics (gathered under the noise) no longer fit: its test accuracy says
little.

In float32, fusedbn's and torch's losses drift apart by rounding that SGD amplifies over the steps; --dtype
float64 shows them agreeing to ~1e-15.

    python examples/landscape.py                                  # cnn on digits, all four: ~1.5 min on a CPU
    python examples/landscape.py --variants none,fusedbn --step-sizes 0.05 0.1 0.2 0.4 --every 5
    python examples/landscape.py --variants fusedbn,torch --dtype float64
    python examples/landscape.py --variants fusedbn,fusedbn+noise --noise 2
"""
import argparse
import itertools
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import common

VARIANTS = ("none", "fusedbn", "torch", "fusedbn+noise")
COLOURS = {"none": "tab:red", "fusedbn": "tab:blue", "torch": "black", "fusedbn+noise": "tab:green"}


class StepNoise(nn.Module):
    """In training mode y = s * x + m, with s ~ U(1, 1 + strength) and m ~ U(-strength, strength) per
    activation, drawn from a generator seeded by (seed, layer, step): fixed within an SGD step, new at the
    next. The training loop sets `step`. The identity in eval mode."""

    def __init__(self, strength, seed, layer):
        super().__init__()
        self.strength, self.seed, self.layer, self.step = strength, seed, layer, 0

    def forward(self, x):
        if not self.training:
            return x
        generator = torch.Generator().manual_seed((self.seed * 1000 + self.layer) * 1_000_003 + self.step)
        scale = 1 + self.strength * torch.rand(x.shape[1:], generator=generator)
        shift = self.strength * (2 * torch.rand(x.shape[1:], generator=generator) - 1)
        return scale.to(x) * x + shift.to(x)

    def extra_repr(self):
        return f"strength={self.strength}, layer={self.layer}"


def make_model(variant, data, args):
    """The model for a variant; fusedbn+noise is fusedbn's with a StepNoise after every BatchNorm."""
    norm = "fusedbn" if variant == "fusedbn+noise" else variant
    model = common.build(args.model, norm, data, args.seed)
    if variant != "fusedbn+noise":
        return model
    layers = []
    for layer in model:
        layers.append(layer)
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layers.append(StepNoise(args.noise, args.seed, len(layers)))
    return nn.Sequential(*layers)


def loss_and_gradient(model, params, buffers, images, labels):
    """L(params) and its gradient on one batch, in the model's current mode. The buffers are cloned, so
    BatchNorm's running statistics stay as they were."""
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    fresh = {name: b.clone() for name, b in buffers.items()}
    loss = F.cross_entropy(functional_call(model, (params, fresh), (images,)), labels)
    gradient = torch.autograd.grad(loss, list(params.values()))
    return loss.item(), dict(zip(params, gradient))


def l2_norm(tensors):
    """The 2-norm of tensors taken together as one vector."""
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


def probe(model, images, labels, step_sizes):
    """Loss range, gradient change and effective beta-smoothness along the gradient direction at w."""
    w = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    loss, g = loss_and_gradient(model, w, buffers, images, labels)
    g_norm, losses, changes, betas = l2_norm(g.values()), [loss], [], []
    for eta in step_sizes:
        loss, g_eta = loss_and_gradient(model, {n: w[n] - eta * g[n] for n in w}, buffers, images, labels)
        change = l2_norm(g_eta[n] - g[n] for n in g)
        losses.append(loss)
        changes.append(change)
        betas.append(change / (eta * g_norm))  # ||grad change|| / ||distance moved||
    return {"loss_min": min(losses), "loss_max": max(losses), "grad_change_min": min(changes),
            "grad_change_max": max(changes), "beta": max(betas)}


def endless_batches(data, args):
    """common.batches, epoch after epoch."""
    for epoch in itertools.count():
        yield from common.batches(data, args.batch_size, epoch, args.seed)


def run(variant, data, args, progress):
    """Plain SGD for --steps steps (not whole epochs, hence not common.train), probing every --every steps
    before the update; the per-step series and the final test accuracy."""
    model = make_model(variant, data, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    series = {"loss": [], "probe_step": [], "loss_min": [], "loss_max": [], "grad_change_min": [],
              "grad_change_max": [], "beta": [], "diverged": False}
    model.train()
    for step, (images, labels) in zip(range(args.steps), endless_batches(data, args)):
        for layer in model:
            if isinstance(layer, StepNoise):
                layer.step = step
        if step % args.every == 0:
            series["probe_step"].append(step)
            for key, value in probe(model, images, labels, args.step_sizes).items():
                series[key].append(value)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        series["loss"].append(loss.item())
        progress.advance(f"{variant} step {step + 1}")
        if not math.isfinite(series["loss"][-1]):
            series["diverged"] = True
            break
    series["test_accuracy"] = common.accuracy(model, *data.test)
    return series


def mean(values):
    return sum(values) / len(values)


def summarise(series):
    """Means over the probed steps, and where training ended."""
    return {"loss_range": mean([hi - lo for lo, hi in zip(series["loss_min"], series["loss_max"])]),
            "grad_change_max": mean(series["grad_change_max"]), "beta": mean(series["beta"]),
            "final_loss": series["loss"][-1], "test_accuracy": series["test_accuracy"]}


def table(summaries):
    """The summaries as aligned text; the first three columns are means over the probed steps."""
    caption = "means over probed steps of: max - min of L(w - eta g), max ||grad change||, effective beta"
    header = f"{'variant':14} {'loss range':>11} {'grad change':>12} {'beta':>10} {'final loss':>11} {'test acc':>9}"
    rows = [f"{name:14} {s['loss_range']:11.4g} {s['grad_change_max']:12.4g} {s['beta']:10.4g} "
            f"{s['final_loss']:11.4f} {100 * s['test_accuracy']:8.1f}%" for name, s in summaries.items()]
    return "\n".join([caption, header, *rows])


def rounded(value):
    """Floats to 6 significant digits (recursively), to keep the JSON small."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


def figure(runs, args):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, series in runs.items():
        steps, colour = series["probe_step"], COLOURS[name]
        for axis, low, high in ((axes[0], "loss_min", "loss_max"), (axes[1], "grad_change_min", "grad_change_max")):
            if name == "torch":  # drawn as a dashed outline over fusedbn's band: they coincide
                axis.plot(steps, series[low], "--", color=colour, linewidth=0.8, label=name)
                axis.plot(steps, series[high], "--", color=colour, linewidth=0.8)
            else:
                axis.fill_between(steps, series[low], series[high], color=colour, alpha=0.35, linewidth=0,
                                  label=name)
        style = dict(linestyle="--", linewidth=0.8) if name == "torch" else dict(linewidth=1.2)
        axes[2].plot(steps, series["beta"], color=colour, label=name, **style)
    etas = ", ".join(f"{eta:g}" for eta in args.step_sizes)
    axes[0].set(title="(a) loss landscape: L(w - eta g), min to max over eta", ylabel="training loss (cross-entropy)")
    axes[1].set(title="(b) gradient predictiveness: min to max over eta", ylabel="||grad L(w - eta g) - grad L(w)||")
    axes[2].set(title="(c) effective beta-smoothness: max over eta",
                ylabel="max ||grad L(w - eta g) - grad L(w)|| / ||eta g||")
    for axis in axes:
        axis.set(xlabel="SGD step", yscale="log")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    fig.suptitle(f"{args.model} on {args.data}, SGD lr {args.lr}, batch {args.batch_size}, eta in [{etas}], "
                 f"noise {args.noise}", fontsize=10)
    fig.tight_layout()
    return fig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=300, help="SGD steps")
    parser.add_argument("--every", type=int, default=2, help="probe the landscape every this many steps")
    parser.add_argument("--step-sizes", type=float, nargs="+",
                        help="the etas of w - eta g (default: 8 values from lr/2 to 4 lr, geometric)")
    parser.add_argument("--variants", type=common.names(VARIANTS), default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--noise", type=float, default=1.0, help="strength of fusedbn+noise's noise")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        parser.error("--steps and --every must be at least 1")
    if args.step_sizes is None:
        args.step_sizes = [float(f"{args.lr * 2 ** (3 * i / 7 - 1):.4g}") for i in range(8)]
    return args


def main(argv=None):
    args = parse_args(argv)
    data = common.setup(args)
    started = time.perf_counter()
    print(f"{args.model} on {args.data}, SGD lr {args.lr}, batch {args.batch_size}, {args.steps} steps, probed "
          f"every {args.every} at eta {args.step_sizes}, seed {args.seed}, {common.machine(args.device)}")
    runs = {}
    with common.Progress(len(args.variants) * args.steps, "probing") as progress:
        for variant in args.variants:
            runs[variant] = run(variant, data, args, progress)
            if runs[variant]["diverged"]:
                progress.print(f"{variant} diverged (loss not finite) at step {len(runs[variant]['loss'])}")
    summaries = {name: summarise(series) for name, series in runs.items()}
    print(table(summaries))
    if "fusedbn+noise" in runs:
        print("(fusedbn+noise's test accuracy is in eval mode, without the noise, under running statistics gathered "
              "with it)")
    difference = common.largest_loss_difference(runs)
    if difference is not None:
        print(f"largest |fusedbn - torch| training loss over {len(runs['torch']['loss'])} steps: {difference:.2e}")
    payload = {"runs": rounded(runs), "summary": rounded(summaries), "largest_loss_difference": difference}
    common.save("landscape", args, payload, figure(runs, args), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
