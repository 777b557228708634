"""What the example scripts share: the datasets, the models with a choice of normalisation layer, training
and evaluation, progress, and where results go."""
import argparse
import json
import math
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedbn

NORMS = ("fusedbn", "torch", "none")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
_BATCH_NORM = {("fusedbn", 1): fusedbn.FusedBatchNorm1d, ("fusedbn", 2): fusedbn.FusedBatchNorm2d,
               ("torch", 1): nn.BatchNorm1d, ("torch", 2): nn.BatchNorm2d}


class Dataset:
    """Images (N, 1, H, W) in float32 and labels, split into train and test, standardised with the training
    images' mean and standard deviation."""

    def __init__(self, name, images, labels, test_fraction, seed):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_test = int(len(labels) * test_fraction)
        train_images = images[order[n_test:]]
        images = (images - train_images.mean()) / train_images.std()
        self.name, self.classes = name, int(labels.max()) + 1
        self.test = images[order[:n_test]], labels[order[:n_test]]
        self.train = images[order[n_test:]], labels[order[n_test:]]

    def to(self, device, dtype):
        self.train = tuple(t.to(device, dtype if t.is_floating_point() else None) for t in self.train)
        self.test = tuple(t.to(device, dtype if t.is_floating_point() else None) for t in self.test)
        return self

    @property
    def image_shape(self):
        return tuple(self.train[0].shape[1:])


def digits(seed=0):
    """scikit-learn's bundled handwritten digits: 1797 images of 8x8 pixels, 10 classes, no download."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return Dataset("digits", images, torch.tensor(data.target), 0.25, seed)


def gratings(seed=0, count=2000, size=12, classes=4):
    """A synthetic image task: sine gratings at one of `classes` orientations, with random frequency, phase
    and contrast, plus pixel noise; the label is the orientation."""
    gen = torch.Generator().manual_seed(1000 + seed)
    labels = torch.randint(0, classes, (count,), generator=gen)
    angle = labels * (math.pi / classes) + 0.15 * torch.randn(count, generator=gen)
    frequency = 0.6 + 0.4 * torch.rand(count, generator=gen)
    phase = 2 * math.pi * torch.rand(count, generator=gen)
    contrast = 0.5 + torch.rand(count, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    along = xs * torch.cos(angle)[:, None, None] + ys * torch.sin(angle)[:, None, None]
    images = contrast[:, None, None] * torch.sin(frequency[:, None, None] * along + phase[:, None, None])
    images = images + 0.5 * torch.randn(images.shape, generator=gen)
    return Dataset("gratings", images.unsqueeze(1), labels, 0.25, seed)


DATASETS = {"digits": digits, "gratings": gratings}


def norm_layer(norm, channels, dims):
    """BatchNorm over `channels` (BatchNorm1d for dims=1, 2d for dims=2) from fusedbn or torch, or none."""
    return nn.Identity() if norm == "none" else _BATCH_NORM[norm, dims](channels)


def cnn(norm, image_shape, classes, width=32, depth=4):
    """`depth` blocks of 3x3 convolution, normalisation, ReLU (a 2x2 max-pool after the second), global
    average pooling, a linear classifier. Convolutions have a bias only without normalisation."""
    layers, channels = [], image_shape[0]
    for block in range(depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=norm == "none"), norm_layer(norm, width, 2),
                   nn.ReLU()]
        if block == 1:
            layers.append(nn.MaxPool2d(2))
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def mlp(norm, image_shape, classes, width=100, depth=3):
    """Ioffe & Szegedy's MNIST network: `depth` fully connected layers of `width` sigmoid units, each
    normalised by BatchNorm1d before its nonlinearity."""
    layers, features = [nn.Flatten()], math.prod(image_shape)
    for _ in range(depth):
        layers += [nn.Linear(features, width, bias=norm == "none"), norm_layer(norm, width, 1), nn.Sigmoid()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, classes))


MODELS = {"cnn": cnn, "mlp": mlp}


def build(model, norm, data, seed):
    """The model, initialised from `seed` alone (fusedbn and torch runs of one seed start identical), on the
    data's device and in its dtype."""
    torch.manual_seed(seed)
    network = MODELS[model](norm, data.image_shape, data.classes)
    for layer in network.modules():  # He et al.'s initialisation for ReLU networks (zero biases)
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and model == "cnn":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    images = data.train[0]
    return network.to(images.device, images.dtype)


def batches(data, batch_size, epoch, seed):
    """The training set in a shuffled order that depends on (seed, epoch) only; the last partial batch is
    dropped so every step normalises over `batch_size` samples."""
    images, labels = data.train
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    order = order.to(labels.device)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield images[index], labels[index]


@torch.no_grad()
def accuracy(model, images, labels):
    was_training = model.training
    model.eval()
    correct = (model(images).argmax(1) == labels).float().mean().item()
    model.train(was_training)
    return correct


def train(model, data, lr, epochs, batch_size, seed, momentum=0.0, on_step=None, progress=None):
    """Plain SGD. Returns per-step losses and per-epoch train/test accuracy; a loss that is not finite
    stops training (the run diverged) and is recorded as such."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    history = {"loss": [], "train_accuracy": [], "test_accuracy": [], "diverged": False}
    model.train()
    for epoch in range(epochs):
        for images, labels in batches(data, batch_size, epoch, seed):
            if on_step is not None:
                on_step(model, images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            history["loss"].append(loss.item())
            if not math.isfinite(history["loss"][-1]):
                history["diverged"] = True
                return history
        history["train_accuracy"].append(accuracy(model, *data.train))
        history["test_accuracy"].append(accuracy(model, *data.test))
        if progress is not None:
            progress(epoch, history)
    return history


class Progress:
    """A rich progress bar on a terminal; one line per task when output is piped."""

    def __init__(self, total, description):
        self.total, self.done = total, 0
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(transient=True)
            self.task = self.bar.add_task(description, total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def advance(self, description):
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=description)

    def print(self, text):
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, flush=True)


def largest_loss_difference(runs):
    """The largest |fusedbn - torch| per-step loss of runs from the same seed, or None without both."""
    if "fusedbn" not in runs or "torch" not in runs:
        return None
    pairs = zip(runs["fusedbn"]["loss"], runs["torch"]["loss"])
    return max((abs(a - b) for a, b in pairs), default=0.0)


def machine(device):
    """The GPU's name, or the CPU's model and the threads torch uses."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    threads = torch.get_num_threads()
    return f"{names[0] if names else platform.machine()} ({threads} thread{'s' if threads > 1 else ''})"


def save(stem, args, payload, figure, started):
    """Writes examples/results/<stem>.json (arguments, machine, seconds, payload) and <stem>.png."""
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["python", *sys.argv]), "machine": machine(args.device),
              "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1),
              "args": vars(args), **payload}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    figure.savefig(out / f"{stem}.png", dpi=110, bbox_inches="tight")
    print(f"wrote {out / stem}.json and .png ({record['seconds']} s on {record['machine']})")
    return record


def names(allowed):
    """An argparse type: a comma-separated list of names, each one of `allowed`."""
    def parse(text):
        chosen = text.split(",")
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
        return chosen

    return parse


def add_common_arguments(parser):
    parser.add_argument("--data", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="model and data (float64 shows fusedbn and torch agreeing to rounding over many steps)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: these models are too small to gain from more)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNG (default: examples/results)")


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    return DATASETS[args.data](args.seed).to(args.device, getattr(torch, args.dtype))
