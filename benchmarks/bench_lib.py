"""Measurement and accounting for the benchmarks: shapes, contenders, timing, byte counts, peak memory and
the correctness check. bench.py is the command line over it; report.py turns its rows into tables, files
and figures.

A row is a flat dict: one (shape, layout, dtype, mode) with every contender's time, bandwidth, fraction of
the roofline and (training step) peak memory, and each of our contenders' time over each anchor's with its
verdict (faster, tie or slower: report.verdict).
"""
import importlib.metadata
import math
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils import benchmark

import fusedbn
from report import verdict_of

MODES = ("train-fwd", "train-fwd-bwd", "eval")
# Passes over the tensor that a non-persistent BatchNorm cannot avoid: training forward reads it for the
# statistics, then reads and writes it to normalize; eval reads and writes once; training backward reads
# x and dy for the two reductions, then x and dy again and writes dx.
PASSES = {"train-fwd": 3, "train-fwd-bwd": 8, "eval": 2}
COPY_PASSES = 2


@dataclass(frozen=True)
class Workload:
    """What the measured op computes: BatchNorm alone ("identity"), act(bn(x)), or act(bn(x) + r) (ResNet's
    block end). `passes` per mode: an activation adds none (act' is recomputed from x); the residual adds a
    read of r in the forward, and in the backward reads of r (or, for relu, of the output: its mask) in
    both passes and a write of r's gradient."""
    name: str
    activation: str
    residual: bool
    passes: dict

    @property
    def fused(self) -> bool:
        return self.activation != "identity"


_ADD_PASSES = {"train-fwd": 4, "train-fwd-bwd": 12, "eval": 3}
WORKLOADS = {w.name: w for w in (
    [Workload("bn", "identity", False, PASSES), Workload("bn+relu", "relu", False, PASSES),
     Workload("bn+add+relu", "relu", True, _ADD_PASSES)]
    + [Workload(f"bn+{a}", a, False, PASSES) for a in ("relu6", "leaky_relu", "elu", "silu", "hardswish", "gelu",
                                                      "gelu_tanh", "prelu")]
    + [Workload("bn+add+silu", "silu", True, _ADD_PASSES), Workload("bn+add+prelu", "prelu", True, _ADD_PASSES)])}
DEFAULT_WORKLOADS = ["bn", "bn+relu", "bn+add+relu"]
# The torch module each activation is in torch's composition (default parameters).
TORCH_ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU,
                     "elu": nn.ELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU,
                     "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "prelu": nn.PReLU}
# Where each activation's derivative jumps (the pre-activation values whose gradient --check cannot pin).
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "hardswish": (-3.0, 3.0), "prelu": (0.0,)}
LAYOUTS = ("NCHW", "NHWC")

# (C, H, W) of every BatchNorm2d input in torchvision's ResNet-50 at 224x224, stem to last stage
# (tests/test_bench.py checks this against the model).
RESNET50_SHAPES = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28),
                   (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7)]
# One of each regime: few channels over a large image, the middle, many channels over a tiny one.
SMALL_SHAPES = [(64, 56, 56), (512, 28, 28), (2048, 7, 7)]
# (C, D, H, W) of the BatchNorm3d inputs of 16 to 128 channels in MONAI's 3-D UNet (benchmarks/models.py's
# unet3d) at a 64^3 input, then at a 32^3 one: the small layers of 10^4-10^6 values at batch 2 (its last
# BatchNorm, 2 channels at the input's size, is left out; tests/test_bench.py checks these against the model).
UNET3D_SHAPES = [(16, 32, 32, 32), (32, 16, 16, 16), (64, 8, 8, 8), (128, 8, 8, 8),
                 (16, 16, 16, 16), (32, 8, 8, 8), (64, 4, 4, 4), (128, 4, 4, 4)]
PRESETS = {"resnet50": RESNET50_SHAPES, "small": SMALL_SHAPES, "unet3d": UNET3D_SHAPES}
# The batch of a preset where it is not the device's default (--batch overrides it).
PRESET_BATCH = {"unet3d": 2}
# Published anchors, whole shapes (no --batch): a 1 GB NCHW tensor (an H200 training forward was published
# at 0.91 ms, torch.compile's at 1.02 ms; its 2-read-1-write bound at ~4.05 TB/s is ~0.80 ms; float16), a
# BatchNorm1d input (N, C, L) with few channels and long rows (torch's backward runs ~100x below the
# roofline there; float16), and a BatchNorm3d input (channels-last-3d as NHWC).
ANCHOR_SHAPES = [(4, 128, 1024, 1024), (20, 6, 65536), (2, 32, 64, 64, 64)]
FIXED_PRESETS = {"anchors": ANCHOR_SHAPES}
# The channels-last memory format of each input rank (2-D and 3-D inputs have none: channels-first only).
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# The BatchNorm of each input rank, as torch names it: (N, C) and (N, C, L) 1d, (N, C, H, W) 2d, (N, C, D, H, W) 3d.
BATCH_NORM_KIND = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}

# Largest difference from torch's BatchNorm that --check accepts, relative to the largest magnitude of the
# quantity compared (weight and bias gradients are sums over N*H*W values, so an absolute bound would not do).
CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def parse_shapes(spec, batch):
    """A preset name (its per-sample shapes at `batch`; anchors: whole shapes) or explicit shapes
    "N,C,H,W;N,C,D,H,W": N, C and up to three spatial sizes, the input of one of torch's BatchNorm*d."""
    if spec in PRESETS:
        return [(batch, *sample) for sample in PRESETS[spec]]
    if spec in FIXED_PRESETS:
        return list(FIXED_PRESETS[spec])
    shapes = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        dims = tuple(int(d) for d in item.split(","))
        if len(dims) not in BATCH_NORM_KIND or min(dims) < 1:
            raise ValueError(f"shape {item!r} is not N,C[,L | ,H,W | ,D,H,W] with positive sizes")
        shapes.append(dims)
    if not shapes:
        raise ValueError(f"no shapes in {spec!r}")
    return shapes


class Composition(nn.Module):
    """A workload around a BatchNorm module `bn`: unfused (torch's modules and ops, one after the other) or
    `bn` itself doing all of it (fused). It exposes bn's parameters and buffers, so every contender is set
    up and checked alike; `residual` is the tensor the add workload adds."""

    def __init__(self, bn, workload, fused, residual):
        super().__init__()
        self.bn, self.workload, self.fused, self.residual = bn, workload, fused, residual
        # PReLU: a weight per channel (nn.PReLU's init, as the fused module's), in the input's dtype.
        act_args = ((bn.num_features,), dict(device=residual.device, dtype=residual.dtype)) \
            if workload.activation == "prelu" else ((), {})
        self.act = TORCH_ACTIVATIONS[workload.activation](*act_args[0], **act_args[1])

    weight = property(lambda self: self.bn.weight)
    bias = property(lambda self: self.bn.bias)
    running_mean = property(lambda self: self.bn.running_mean)
    running_var = property(lambda self: self.bn.running_var)

    def forward(self, x):
        r = self.residual if self.workload.residual else None
        if self.fused:
            return self.bn(x, r) if self.workload.fused else self.bn(x)
        y = self.bn(x)
        return self.act(y if r is None else y + r)


@dataclass(frozen=True)
class Contender:
    """One implementation in the race: `make(num_features, device, param_dtype, workload, residual)` builds
    a fresh module computing the workload for an input of the residual's rank, with the parameters and
    buffers of torch's BatchNorm of that rank. `description` names the modules with "{d}" for the ranks'
    kinds (describe())."""
    name: str
    description: str
    make: Callable[..., nn.Module]

    def describe(self, shapes):
        """The description for a run of `shapes`: "{d}" becomes their kinds, e.g. "3d" or "1d/2d/3d"."""
        kinds = sorted({BATCH_NORM_KIND[len(shape)] for shape in shapes})
        return self.description.format(d="/".join(kinds))


def _torch_composition(c, device, dtype, workload, residual):
    batch_norm = getattr(nn, f"BatchNorm{BATCH_NORM_KIND[residual.dim()]}")
    return Composition(batch_norm(c, device=device, dtype=dtype), workload, False, residual)


def _compiled_composition(c, device, dtype, workload, residual):
    # Each shape compiles afresh: past dynamo's recompile limit the module would silently run eager.
    torch._dynamo.reset()
    return torch.compile(_torch_composition(c, device, dtype, workload, residual), dynamic=False)


def _fused(c, device, dtype, workload, residual):
    d = BATCH_NORM_KIND[residual.dim()]  # the module of the input's rank, as torch's
    if workload.activation == "identity":
        bn = getattr(fusedbn, f"FusedBatchNorm{d}")(c, device=device, dtype=dtype)
    elif workload.activation == "relu":
        bn = getattr(fusedbn, f"FusedBatchNormReLU{d}")(c, device=device, dtype=dtype)
    else:
        bn = getattr(fusedbn, f"FusedBatchNormAct{d}")(c, device=device, dtype=dtype, activation=workload.activation)
    return Composition(bn, workload, True, residual)


# What users would run instead: eager is always measured and is --check's reference; --compare adds compile.
ANCHORS = {
    "eager": Contender("torch", "eager nn.BatchNorm{d} (then + r, relu as the workload asks)", _torch_composition),
    "compile": Contender("compile", "the same torch.compile'd (inductor)", _compiled_composition),
}
# Ours: each is timed against every anchor. Later kernels join by adding an entry.
OURS = [Contender("fusedbn", "fusedbn.FusedBatchNorm{d}, or FusedBatchNormReLU{d} / FusedBatchNormAct{d} for the "
                   "activation workloads", _fused)]


@dataclass(frozen=True)
class Setup:
    """The tensors one set of rows is measured on."""
    shape: tuple
    layout: str
    dtype: torch.dtype
    param_dtype: torch.dtype
    device: str
    workload: Workload = WORKLOADS["bn"]

    def make_tensors(self, seed=0):
        """The input, the upstream gradient and the residual (a leaf needing its gradient), seeded, in the
        setup's layout."""
        generator = torch.Generator().manual_seed(seed)
        fmt = CHANNELS_LAST[len(self.shape)] if self.layout == "NHWC" else torch.contiguous_format
        x, grad, residual = [torch.randn(self.shape, generator=generator).to(device=self.device, dtype=self.dtype,
                                                                             memory_format=fmt) for _ in range(3)]
        return x, grad, residual.requires_grad_(True)

    def describe(self):
        return f"{self.workload.name} {'x'.join(map(str, self.shape))} {self.layout} {dtype_name(self.dtype)}"


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def passes(setup, mode):
    return setup.workload.passes[mode]


def tensor_bytes(setup, passes):
    """Bytes a kernel making `passes` full passes over the input must move (parameters are negligible)."""
    return passes * math.prod(setup.shape) * setup.dtype.itemsize


# A row is flagged unsteady where the plain copy's time moved by more than this fraction between rounds:
# the machine's load changed under the measurement (a shared machine once showed a copy at 0.8 GB/s).
UNSTEADY_COPY = 0.25


def interleaved_medians(fns, min_run_time, rounds):
    """(best, spread) per callable: the median time from Timer.blocked_autorange, measured in interleaved
    rounds (a, b, c, a, b, c, ...) with each one's best round kept, so a burst of load on the machine hits
    every contender alike and is filtered out; and (slowest round - best) / best. Timer synchronises CUDA."""
    for fn in fns:
        fn()  # warm-up: lazy initialisation, compilation, the allocator's first blocks
    # Timer runs on one thread unless told otherwise; time what the process is set to use.
    timers = [benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for fn in fns]
    medians = [[] for _ in fns]
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            medians[i].append(timer.blocked_autorange(min_run_time=min_run_time / rounds).median)
    return [min(m) for m in medians], [max(m) / min(m) - 1 for m in medians]


def graphed(fn):
    """`fn` captured in a CUDA graph, as torch.cuda.graphs documents it (warmed up on a side stream first),
    and returned as the graph's replay: timing it measures the kernels without the host's launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def runner(module, x, grad, mode, residual=None):
    """A callable running `module` on `x` as `mode` does (training forward records the autograd graph as
    in training; eval runs under no_grad as inference does). `residual`'s gradient is cleared each step."""
    module.train(mode != "eval")
    if mode == "train-fwd":
        return lambda: module(x)
    if mode == "eval":
        def infer():
            with torch.no_grad():
                return module(x)
        return infer
    x = x.detach().requires_grad_(True)

    def step():
        module(x).backward(grad)
        x.grad = None
        if residual is not None:
            residual.grad = None
    return step


def training_step_peak_bytes(module, x, grad, residual=None):
    """Memory one training step (forward + backward) needs beyond what exists before it: on CUDA the peak
    allocated during the step; on CPU, which has no allocator statistics, the bytes saved for backward,
    each storage counted once (the input is among them: saving it is what keeps it alive)."""
    step = runner(module, x, grad, "train-fwd-bwd", residual)
    step()  # warm-up, so that compilation and weight.grad's first allocation are not counted
    module.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        step()
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - before
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def build_modules(setup, contenders, residual, seed=0):
    """A module per contender, all with the same random weight and bias (so --check sees them used) and the
    same residual."""
    channels = setup.shape[1]
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator)
    modules = {}
    for contender in contenders:
        module = contender.make(channels, setup.device, setup.param_dtype, setup.workload, residual)
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
        modules[contender.name] = module
    return modules


def _check_results(module, x, grad, residual):
    """What a training step and a following eval forward produce."""
    module.train()
    xg = x.detach().requires_grad_(True)
    residual.grad = None
    out = module(xg)
    out.backward(grad)
    results = dict(output=out, grad_input=xg.grad, grad_weight=module.weight.grad, grad_bias=module.bias.grad,
                   running_mean=module.running_mean.clone(), running_var=module.running_var.clone())
    if residual.grad is not None:  # the add workload
        results["grad_residual"] = residual.grad
    module.eval()
    with torch.no_grad():
        results["eval output"] = module(x)
    module.zero_grad(set_to_none=True)
    return results


def _kink_allowance(setup, x, grad, residual, weight, bias):
    """An activation's gradient jumps at its kinks (relu's 0): where two correct float computations of a
    pre-activation within rounding of a kink land on either side, their gradients rightly differ there
    (by at most 1.5 dy). The training step's pre-activations in float64 locate those values ("flips"), left
    out of the elementwise gradients; what they can add to a channel's sums (1.5 |dy|, times |x_hat| for
    the weight) is allowed on top of the tolerance; through the training dx's mean terms, each other value
    of the channel may move by (sum_dy + |x_hat| sum_dy_xhat) * |a| / m, a = weight / std."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [-1 if d == 1 else 1 for d in range(x.dim())]
    z = torch.nn.functional.batch_norm(x.double(), None, None, weight.detach().double(), bias.detach().double(),
                                       training=True)
    if setup.workload.residual:
        z = z + residual.detach().double()
    rounding = 64 * torch.finfo(setup.dtype).eps * (z.abs() + 1)
    flips = torch.zeros_like(z, dtype=torch.bool)
    for kink in KINKS[setup.workload.activation]:
        flips |= (z - kink).abs() <= rounding
    std = x.double().std(dims, keepdim=True)
    x_hat = ((x.double() - x.double().mean(dims, keepdim=True)) / std).abs()
    dy = torch.where(flips, 1.5 * grad.double().abs(), 0)
    sum_dy, sum_dy_xhat = dy.sum(dims), (dy * x_hat).sum(dims)
    a = weight.detach().double().abs().view(shape) / std
    count = x.numel() // x.shape[1]
    spread = (sum_dy.view(shape) + x_hat * sum_dy_xhat.view(shape)) * a / count
    return flips, {"grad_bias": sum_dy, "grad_weight": sum_dy_xhat, "grad_input": spread}


def check(setup, modules, x, grad, residual, reference):
    """Mismatches of every module's training step and eval forward against `reference`'s, as messages."""
    expected = _check_results(modules[reference], x, grad, residual)
    tolerance = CHECK_TOLERANCE[setup.dtype]
    mismatches = []
    for name, module in modules.items():
        if name == reference:
            continue
        results = _check_results(module, x, grad, residual)
        flips, allowance = (_kink_allowance(setup, x, grad, residual, module.weight, module.bias)
                            if setup.workload.activation in KINKS else (None, {}))
        for quantity, value in results.items():
            want = expected[quantity]
            if value is None or value.shape != want.shape or value.dtype != want.dtype:
                mismatches.append(f"{name} {setup.describe()}: {quantity} is "
                                  f"{None if value is None else (tuple(value.shape), value.dtype)}, "
                                  f"{reference} gives {(tuple(want.shape), want.dtype)}")
                continue
            difference = (value.double() - want.double()).abs()
            if flips is not None and quantity in ("grad_input", "grad_residual"):
                difference = torch.where(flips, 0, difference)
            if quantity in allowance:
                difference = (difference - allowance[quantity]).clamp_min(0)
            scale = want.abs().max().double().clamp_min(torch.finfo(torch.float64).tiny)
            error = (difference.max() / scale).item()
            if not error <= tolerance:  # also catches NaN
                mismatches.append(f"{name} {setup.describe()}: {quantity} differs from {reference}'s by "
                                  f"{error:.2e} of its largest value (tolerance {tolerance:.0e})")
    return mismatches


def measure(setup, modules, anchors, ours, x, grad, residual, mode, min_run_time, rounds, peak_bytes=None,
            cuda_graph=False):
    """One row: a plain copy (the bandwidth yardstick) and every module, interleaved on the same tensors.
    `peak_bytes` (name -> bytes) belongs to training-step rows. `cuda_graph`: each one (the copy too)
    replayed from a CUDA graph, which leaves the kernels' time without the host's."""
    # A copy into a preallocated tensor: clone would also time the allocation and, on the CPU, the page
    # faults of first touching fresh memory, which are no property of the memory system.
    copy_out = torch.empty_like(x)
    names = [c.name for c in anchors + ours]
    fns = [lambda: copy_out.copy_(x)] + [runner(modules[n], x, grad, mode, residual) for n in names]
    times, spreads = interleaved_medians([graphed(fn) for fn in fns] if cuda_graph else fns, min_run_time, rounds)
    copy_s, times = times[0], dict(zip(names, times[1:]))
    nbytes = tensor_bytes(setup, passes(setup, mode))
    copy_bandwidth = tensor_bytes(setup, COPY_PASSES) / copy_s
    row = dict(workload=setup.workload.name, shape=list(setup.shape), layout=setup.layout,
               dtype=dtype_name(setup.dtype), param_dtype=dtype_name(setup.param_dtype), mode=mode,
               passes=passes(setup, mode), bytes=nbytes, cuda_graph=cuda_graph,
               copy_s=copy_s, copy_gbps=copy_bandwidth / 1e9, copy_spread=spreads[0],
               unsteady=spreads[0] > UNSTEADY_COPY)
    for name, seconds, spread in zip(names, times.values(), spreads[1:]):
        row[f"{name}_s"] = seconds
        row[f"{name}_spread"] = spread
        row[f"{name}_gbps"] = nbytes / seconds / 1e9
        row[f"{name}_roofline"] = nbytes / seconds / copy_bandwidth
    for mine in ours:
        for anchor in anchors:
            row[f"{mine.name}_over_{anchor.name}"] = times[mine.name] / times[anchor.name]
            row[f"{mine.name}_vs_{anchor.name}"] = verdict_of(row, mine.name, anchor.name)
    for name in names:
        row[f"{name}_peak_bytes"] = None if peak_bytes is None else peak_bytes[name]
    return row


def _fusedbn_version():
    try:
        return importlib.metadata.version("fusedbn")
    except importlib.metadata.PackageNotFoundError:  # built in place: name the checkout's commit
        try:
            rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                 cwd=Path(fusedbn.__file__).parent, check=True).stdout.strip()
            return f"source tree {rev}"
        except (OSError, subprocess.CalledProcessError):
            return "source tree"


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    """What the numbers depend on, for the header and the results files."""
    if device.startswith("cuda"):
        machine = torch.cuda.get_device_name(device)
        backend = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        machine = _cpu_name()
        backend = platform.machine()
    return dict(machine=machine, device=device, backend=backend, torch=torch.__version__,
                fusedbn=_fusedbn_version(), threads=torch.get_num_threads(), python=platform.python_version())
