"""What a benchmark row launches on the GPU, for gpu_model.py: each kernel with its grid, block, the bytes it
moves through DRAM and its serial merge tails, and torch's own small kernels around fusedbn's.

Two sources of a plan:
  * `recorded_plan`: fusedbn's host code run under the SIMT emulator with an H200-shaped device, recording
    its launches instead of running them (fusedbn._simt.set_record_only); for the kernels of today's
    build and later ones (v2, v3).
  * `v1_plan`: the launches of the v1 kernels (commit ede88ac, measured on the H100), which have no launch
    recording: csrc/cuda/front.h of that commit, `launch_reduce` and `launch_elementwise`, written out here.
"""
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

MODES = ("train-fwd", "train-fwd-bwd", "eval")
# The benchmark's accounting (bench_lib.PASSES): passes over the tensor each mode cannot avoid.
PASSES = {"train-fwd": 3, "train-fwd-bwd": 8, "eval": 2}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# torch's kernels per step around fusedbn's (a launch each, no bytes worth counting): the training
# forward's num_batches_tracked += 1; the backward's accumulation of weight.grad and bias.grad (the
# benchmark never clears them).
TORCH_LAUNCHES = {"train-fwd": 1, "train-fwd-bwd": 3, "eval": 0}


@dataclass(frozen=True)
class Row:
    """One benchmark row: shape (N, C, spatial...), layout NCHW (channels-first) or NHWC (channels-last),
    input dtype (parameters float32), mode."""
    shape: tuple
    layout: str
    dtype: str
    mode: str

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def tensor_bytes(self):
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def channels(self):
        return self.shape[1]

    @property
    def spatial(self):
        return math.prod(self.shape[2:])


@dataclass(frozen=True)
class Launch:
    """One kernel launch. `kernel`: its name as normalized by `kernel_key` (None: a torch kernel, timed as
    a launch only). `reads`/`writes`: DRAM bytes; `streams`: tensors read per element; `vec_bytes`: the
    width of each stream's loads; `coef_loads`: per-channel loads per vector in the loop (L1 hits, not
    DRAM traffic), each touching `coef_lines` 128-byte L1 lines for a warp. Serial tails: `block_merges`,
    the merges one thread does at each block's end (`welford`: Welford merges, else sums);
    `grid_merges`, the last block's chain over the other blocks' partials, each step after `round_trips`
    dependent L2 loads."""
    kernel: str = None
    grid: tuple = (1, 1, 1)
    block: tuple = (1, 1, 1)
    shared: int = 0
    reads: int = 0
    writes: int = 0
    streams: int = 1
    vec_bytes: int = 16
    coef_loads: int = 0
    coef_lines: int = 1
    welford: bool = False
    block_merges: int = 0
    grid_merges: int = 0
    round_trips: int = 1


@functools.cache
def cpp_enums():
    """{enum: its enumerators in order} of fusedbn's C++ enum classes (csrc/*.h of this checkout)."""
    found = {}
    for header in sorted((Path(__file__).resolve().parents[1] / "csrc").glob("*.h")):
        for name, body in re.findall(r"enum class (\w+)[^{;]*\{([^}]*)\}", header.read_text()):
            found[name] = [e.strip() for e in re.sub(r"//[^\n]*", "", body).split(",") if e.strip()]
    return found


def kernel_key(name):
    """A kernel's name without namespaces, return type, parameters or spaces, so the emulator's record
    ("fusedbn::cuda::k<WelfordReducer<float, float>, FixedActivation<fusedbn::Activation::kRelu>, 4>")
    and a demangled SASS name ("void fusedbn::cuda::k<fusedbn::cuda::WelfordReducer<float, float>,
    FixedActivation<(fusedbn::Activation)1>, 4>(...)") meet: an enum argument by its enumerator's name."""
    name = name.split(";")[0].removeprefix("void ")
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    name = re.sub(r"\s+", "", re.sub(r"\b[A-Za-z_]\w*::", "", name))
    return re.sub(r"\((\w+)\)(\d+)", lambda m: cpp_enums()[m[1]][int(m[2])] if m[1] in cpp_enums() else m[0], name)


def _ceil_div(a, b):
    return -(-a // b)


V1_MAX_THREADS = 512  # v1's threads per block on a GPU (CudaContext::max_threads)


def _v1_type(dtype):
    return {"float32": "float", "bfloat16": "BFloat16", "float16": "Half"}[dtype]


def _v1_reduce(row, sms, welford, itemsize):
    """front.h launch_reduce at ede88ac: grid, block and tails."""
    t = _v1_type(row.dtype)
    kvec = 16 // itemsize
    N, C, S = row.shape[0], row.channels, row.spatial
    count = N * S
    streams = 1 if welford else 2
    reducer = f"WelfordReducer<{t},float>,StatsFinisher<float,float>" if welford else \
        f"GradReducer<{t},float>,GradFinisher<float,float>"
    target = 4 * sms
    reads = streams * row.tensor_bytes
    if row.layout == "NCHW":
        vec = kvec if S % kvec == 0 else 1
        threads = min(V1_MAX_THREADS, max(32, _ceil_div(count // vec, 32) * 32))
        max_splits = max(1, count // (threads * vec * 4))
        splits = min(_ceil_div(target, C), max_splits, 65535)
        launch = Launch(f"channels_first_reduce_kernel<{reducer},{vec}>", (C, splits, 1), (threads, 1, 1),
                        reads=reads, streams=streams, vec_bytes=vec * itemsize, welford=welford,
                        block_merges=threads // 32 - 1, grid_merges=splits if splits > 1 else 0)
    else:
        rows_per_block = V1_MAX_THREADS // 32
        groups = _ceil_div(C, 32)
        max_splits = max(1, N * S // (rows_per_block * 8))
        splits = min(_ceil_div(target, groups), max_splits, 65535)
        launch = Launch(f"channels_last_reduce_kernel<{reducer}>", (groups, splits, 1), (32, rows_per_block, 1),
                        reads=reads, streams=streams, vec_bytes=itemsize, welford=welford,
                        block_merges=rows_per_block - 1, grid_merges=splits if splits > 1 else 0)
    # The per-launch zeroed semaphores (at::zeros) where the channel is split: one fill kernel.
    return [launch] + ([Launch()] if launch.grid[1] > 1 else [])


def _v1_elementwise(row, sms, backward, itemsize):
    """front.h launch_elementwise at ede88ac."""
    t = _v1_type(row.dtype)
    kvec = 16 // itemsize
    inner = row.channels if row.layout == "NHWC" else row.spatial
    vec = kvec if inner % kvec == 0 else 1
    blocks = min(_ceil_div(row.numel // vec, 256), 8 * sms)
    op = f"BackwardElemtOp<{t},float>" if backward else f"NormalizeOp<{t},float>"
    streams = 2 if backward else 1
    # NormalizeOp reads mean, alpha, beta per vector (NCHW: one channel a warp, mostly) or per lane (NHWC:
    # a warp's lanes cover min(32 * vec, C) channels of 4-byte coefficients); BackwardElemtOp four.
    per_lane = row.layout == "NHWC"
    coefs = (4 if backward else 3) * (vec if per_lane else 1)
    lines = _ceil_div(min(32 * vec, row.channels) * 4, 128) if per_lane else 1
    return Launch(f"elementwise_kernel<{op},{vec}>", (blocks, 1, 1), (256, 1, 1), reads=streams * row.tensor_bytes,
                  writes=row.tensor_bytes, streams=streams, vec_bytes=vec * itemsize, coef_loads=coefs,
                  coef_lines=lines)


def v1_plan(row, sms):
    """The v1 kernels' launches for `row` (bn workload, float32 parameters), from front.h at ede88ac:
    training forward = reduce (+ fill) + normalize; eval = three small torch ops for alpha (add, rsqrt,
    mul) + normalize; backward = gradient reduce (+ fill) + dx."""
    itemsize = ITEMSIZE[row.dtype]
    forward = _v1_reduce(row, sms, True, itemsize) + [_v1_elementwise(row, sms, False, itemsize)]
    torch_launches = [Launch()] * TORCH_LAUNCHES[row.mode]
    if row.mode == "eval":
        return [Launch()] * 3 + [_v1_elementwise(row, sms, False, itemsize)]
    if row.mode == "train-fwd":
        return forward + torch_launches
    return (forward + _v1_reduce(row, sms, False, itemsize) + [_v1_elementwise(row, sms, True, itemsize)]
            + torch_launches)


# --- Plans recorded from today's host code -----------------------------------------------------------


def template_args(key):
    """The top-level template arguments of a kernel key, as strings."""
    inner = key[key.index("<") + 1:key.rindex(">")]
    args, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        depth += (ch == "<") - (ch == ">")
        if ch == "," and depth == 0:
            args.append(inner[start:i])
            start = i + 1
    return args + [inner[start:]]


def recorded_launch(row, record, merge_tails):
    """A Launch from one recorded launch: the bytes and vector width follow from the kernel's family and
    template arguments (reductions read x, or dy and x; the normalize and dx passes also write one tensor;
    the one-pass forward reads x once and writes y; a family with no rule here is an error);
    `merge_tails(family, grid, block, kvec, welford)` gives the serial merges of the kernel version at hand."""
    key = kernel_key(record["kernel"])
    args = template_args(key)
    itemsize = ITEMSIZE[row.dtype]
    family = key[:key.index("<")]
    kvec = next(int(a) for a in args if a.isdigit())  # the first integer template argument
    welford = args[0].startswith("WelfordReducer")
    streams = 2 if args[0].startswith(("GradReducer", "BackwardElemtOp")) else 1
    if family == "channels_first_forward_kernel":
        welford, writes = True, row.tensor_bytes
    elif family.endswith("_reduce_kernel"):
        writes = 0
    elif family.endswith("_elementwise_kernel"):
        writes = row.tensor_bytes
    else:
        raise ValueError(f"{family}: what it moves is not known to launch_plans.recorded_launch")
    block_merges, grid_merges, round_trips = merge_tails(family, record["grid"], record["block"], kvec, welford)
    return Launch(key, tuple(record["grid"]), tuple(record["block"]), record.get("shared", 0),
                  reads=streams * row.tensor_bytes, writes=writes, streams=streams, vec_bytes=kvec * itemsize,
                  welford=welford, block_merges=block_merges, grid_merges=grid_merges, round_trips=round_trips)


def v2_merge_tails(family, grid, block, kvec, welford):
    """The serial merges of the v2 kernels (csrc/cuda/kernels.cuh at 518598e, the review's P4/P5):
    channels-first, thread 0 merges the warps' totals (block_merge) and the last block merges the splits
    spread over its threads; channels-last, column_merge's log2(rows) steps per lane and the last block's
    loop over splits / rows per lane, one lane after the other, each step loading the count, then mean and
    M2 (two dependent L2 round trips; the gradient sums, one)."""
    threads = block[0] * block[1] * block[2]
    splits = grid[1]
    if family == "channels_first_reduce_kernel":
        return threads // 32 - 1, _ceil_div(splits, block[0]) if splits > 1 else 0, 2 if welford else 1
    if family == "channels_last_reduce_kernel":
        steps = int(math.log2(block[1])) * kvec
        return steps, _ceil_div(splits, block[1]) * kvec if splits > 1 else 0, 2 if welford else 1
    if family == "channels_first_forward_kernel":
        return threads // 32 - 1, 0, 1
    return 0, 0, 1


def v3_merge_tails(family, grid, block, kvec, welford):
    """The serial merges of the v3 kernels (csrc/cuda/merges.cuh, reduce_kernels.cuh): the warps' totals
    by a second shuffle round (log2(32) steps); channels-last, column_merge as in v2 and the last block's
    loop over splits / rows with two lanes' chains at a time, their partials loaded together before the
    merges (one L2 round trip a step)."""
    threads = block[0] * block[1] * block[2]
    splits = grid[1]
    if family in ("channels_first_reduce_kernel", "channels_first_forward_kernel"):
        grid_merges = _ceil_div(splits, block[0]) if family == "channels_first_reduce_kernel" and splits > 1 else 0
        return int(math.log2(min(threads, 32 * 32) // 32 or 1)), grid_merges, 1
    if family == "channels_last_reduce_kernel":
        steps = int(math.log2(block[1])) * kvec
        return steps, _ceil_div(splits, block[1]) * _ceil_div(kvec, 2) if splits > 1 else 0, 1
    return 0, 0, 1


# Each kernel version's serial merges (the source decides them, not the launch); others are taken as v2's.
MERGE_TAILS = {"v2": v2_merge_tails, "v3": v3_merge_tails}


def simt_recorder(simt_library=None):
    """A function row -> recorded launches (list of dicts): fusedbn's ops routed to the emulator, with an
    H200-shaped device and record-only launches, run on empty CPU tensors of the row's shape; the ops'
    routing and the emulator's settings are restored after each row. The emulator is the installed
    fusedbn._simt, or the fusedbn package at `simt_library` (a directory holding fusedbn/), imported first."""
    import sys

    if simt_library:
        sys.path.insert(0, str(simt_library))
    import torch

    import fusedbn
    import fusedbn._simt as simt
    from fusedbn._op_autograd import register_autograd_kernels

    register_autograd_kernels("fusedbn_simt")
    ops = ("forward_train", "forward_eval", "backward", "batch_stats", "grad_sums", "backward_elemt")
    modules = {3: fusedbn.FusedBatchNorm1d, 4: fusedbn.FusedBatchNorm2d, 5: fusedbn.FusedBatchNorm3d}
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}

    def run(row):
        fmt = formats[len(row.shape)] if row.layout == "NHWC" else torch.contiguous_format
        module = modules[len(row.shape)](row.channels)
        x = torch.empty(row.shape, dtype=getattr(torch, row.dtype), memory_format=fmt)
        if row.mode == "eval":
            with torch.no_grad():
                module.eval()(x)
        elif row.mode == "train-fwd":
            module.train()(x)
        else:
            x.requires_grad_(True)
            module.train()(x).backward(torch.empty_like(x))

    def record(row):
        saved = {name: getattr(fusedbn.ops, name) for name in ops + ("namespace",)}
        device, record_only = simt.device()["name"], simt.record_only()
        try:
            fusedbn.ops.namespace = "fusedbn_simt"  # the ops fusedbn._C's eager autograd calls
            for name in ops:
                setattr(fusedbn.ops, name, getattr(torch.ops.fusedbn_simt, name))
            simt.set_device("h200")
            simt.set_record_only(True)
            simt.recorded_launches()  # clear
            run(row)
            return simt.recorded_launches()
        finally:
            for name, op in saved.items():
                setattr(fusedbn.ops, name, op)
            simt.set_device(device)
            simt.set_record_only(record_only)
    return record


def recorded_plan(row, recorder, version):
    """The row's launches as the host code records them, plus torch's (TORCH_LAUNCHES)."""
    tails = MERGE_TAILS.get(version, v2_merge_tails)
    return [recorded_launch(row, r, tails) for r in recorder(row)] + [Launch()] * TORCH_LAUNCHES[row.mode]
