"""A calibrated model of fusedbn's speed on a GPU, from the machine code alone: PREDICTIONS, not measurements.

    python benchmarks/gpu_model.py --gpu h100 --kernels-version v1 --library v1-ops.o --calibrate
    python benchmarks/gpu_model.py --gpu h200 --kernels-version v2 --library fusedbn/_C.so --simt-library DIR

Each benchmark row (mode, layout, dtype, shape; workload bn) is the kernels it launches (launch_plans.py:
grid, block, DRAM bytes, serial merge tails, torch's small kernels). Each kernel's facts come from its
sm_90 SASS (sass.py; `facts_from_library`): registers and shared memory -> resident blocks per SM; of its
streaming loop's trip, the stream loads issued before the first use of one's value (bytes in flight per
thread), the instructions, and the loads (L1 wavefronts). A kernel with n blocks resident streams at

    rate(n) = min(DRAM ceiling of its read/write mix,
                  n * threads * bytes in flight a thread / latency * bytes moved / bytes read,  (Little's law)
                  busy SMs * 4 warp-instructions a cycle * clock * bytes a warp's trip reads
                      / instructions a trip * bytes moved / bytes read,                          (issue)
                  busy SMs * 1 L1 wavefront a cycle * clock * bytes a warp's trip reads
                      / wavefronts a trip * bytes moved / bytes read)                            (LSU)

wave by wave (grid / (blocks per SM * SMs) waves, the last one partial): the wave's bytes over its rate
plus each wave's per-block serial merges; then the last block's chain over the other blocks' partials
(dependent L2 round trips); plus a per-launch cost. A row's time is the sum over its kernels, its fraction
of copy bandwidth the benchmark's: passes * tensor bytes / time / copy bandwidth.

Free parameters, fitted by --calibrate on the v1 kernels' H100 table (the only GPU measurements): the
loaded DRAM latency and the per-launch cost. Everything else is the GPU table below or the SASS.
"""
import argparse
import json
import math
import re
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import launch_plans
from launch_plans import MODES, PASSES, Row

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "model"
H100_TABLES = [ROOT / "results" / "h100" / f"bench-{d}.json" for d in ("float32", "bfloat16")]


@dataclass(frozen=True)
class Gpu:
    """One GPU. Bandwidths in bytes/s: read-only streams, a 2-read-1-write mix and a copy (1 read, 1
    write), the ceilings kernels meet; `copy` is also the benchmark's yardstick."""
    name: str
    sms: int
    clock_hz: float
    read: float
    mix: float
    copy: float
    l2_latency_s: float
    issue_per_cycle: int = 4        # warp-instructions per cycle per SM (4 schedulers)
    l1_lines_per_cycle: int = 1     # 128-byte L1 wavefronts per cycle per SM (the LSU's throughput)
    threads_per_sm: int = 2048
    registers_per_sm: int = 65536
    shared_per_sm: int = 233472     # 228 KB, of which 1 KB is reserved per block
    blocks_per_sm: int = 32

    def ceiling(self, reads, writes):
        """The DRAM ceiling of a kernel's mix, piecewise linear in its write share: read-only, 2R1W, 1R1W."""
        w = writes / (reads + writes)
        if w <= 1 / 3:
            return self.read + (self.mix - self.read) * w * 3
        return self.mix + (self.copy - self.mix) * (w - 1 / 3) * 6


# H200: the measured ceilings in the issue (read ~4.5, 2R1W ~4.05, copy 3.9-4.3 TB/s: its middle).
# H100 SXM: copy = the median over the H100 table's rows of 2 * tensor bytes / clone time (the
# `h100_copy` function; a test keeps the two equal); its read and mix ceilings are the copy scaled by the
# H200's ratios (an assumption: no H100 read-only measurement exists). Both: 132 SMs at the 1.98 GHz
# boost; an L2 hit ~300 cycles.
H200 = Gpu("H200", sms=132, clock_hz=1.98e9, read=4.5e12, mix=4.05e12, copy=4.05e12, l2_latency_s=0.15e-6)
H100_COPY = 2.973e12
H100 = Gpu("H100 SXM", sms=132, clock_hz=1.98e9, read=H100_COPY * H200.read / H200.copy,
           mix=H100_COPY * H200.mix / H200.copy, copy=H100_COPY, l2_latency_s=0.15e-6)
GPUS = {"h100": H100, "h200": H200}

# A Welford merge (an int64 count converted, an IEEE division) and a gradient-sums merge (two adds), in
# cycles: the serial tails' step cost besides their L2 round trips.
MERGE_CYCLES = {True: 60, False: 8}


@dataclass(frozen=True)
class Params:
    """The fitted parameters: loaded DRAM latency and per-launch overhead (launch gap, ramp and drain)."""
    latency_s: float
    launch_s: float


# What --calibrate fits on the H100 table with the v1 kernels' SASS (results/model/v1-sass-facts.json).
CALIBRATED = Params(latency_s=0.532e-6, launch_s=8.75e-6)
# The sensitivity each prediction also gives: the loaded latency at the top of the review's range. The H100
# fit rejects it (RMS error 8 points), but its latency-bound kernels ran at a third of the bandwidth; the
# latency near the ceiling, where queues build up, is in no measurement.
SLOW_LATENCY_S = 0.8e-6


@dataclass(frozen=True)
class KernelFacts:
    """What the model needs of a kernel's SASS: registers and static shared memory per block, and of its
    streaming loop's trip: the instructions, the global loads by width (bytes: count) and, of the stream
    width, those issued before the first use of one's value; each count also without the loads under a
    guard predicate (`unguarded_*`: a residual that may be null, an x that eval's backward skips)."""
    registers: int
    shared: int
    instructions: int = 0
    loads: dict = None
    unguarded_loads: dict = None
    loads_before_use: int = 0
    unguarded_before_use: int = 0


SCALAR_SIZES = {"BFloat16": 2, "Half": 2, "float": 4, "double": 8}


def stream_width(kernel):
    """The bytes of each of the kernel's stream loads: kVec (its first integer template argument, 1 without
    one) elements of its scalar type (its first template argument's first, down to a plain type). Read
    from the kernel key: sass.Kernel.int_args stops at an enum argument's cast, "(Activation)0"."""
    args = launch_plans.template_args(launch_plans.kernel_key(kernel.name))
    kvec = next((int(a) for a in args if a.isdigit()), 1)
    scalar = args[0]
    while "<" in scalar:
        scalar = launch_plans.template_args(scalar)[0]
    return kvec * SCALAR_SIZES[scalar]


def stream_loop(kernel, sass):
    """The loop that streams the tensors: of the kernel's loops holding no other one that loads at the
    stream width, the one whose trip loads the most bytes at that width; the shortest among equals. sass.hot_loop picks the widest loads instead, which
    for a scalar kernel (4- or 2-byte streams) is the 8-byte loop merging the other blocks' partials."""
    width = stream_width(kernel)
    heads = {}
    for i in kernel.instructions:
        if i.target is not None and i.target <= i.address:
            heads[i.target] = max(heads.get(i.target, 0), i.address)
    loops = [sass._trip(kernel.instructions, start, end, back_edge=True) for start, end in heads.items()]
    loops = [loop for loop in loops if loop.loads[width]]
    if not loops:
        return sass.hot_loop(kernel)  # the one-launch forward's straight-line region, or None

    def innermost(loop):  # an outer loop (over channels) would count the streaming loop's body once, and more
        return not any(loop.start <= other.start and other.end <= loop.end and other is not loop for other in loops)
    return max(loops, key=lambda loop: (innermost(loop), loop.loads[width], loop.start - loop.end))


def stream_loads_before_use(loop, width, guarded):
    """The stream-width loads (`guarded`: those under a predicate too) a trip issues before it first reads
    a value one of them loaded (a per-channel coefficient read earlier is an L1 hit, no wait for DRAM)."""
    loaded, issued = set(), 0
    for i in loop.path:
        if i.registers_read() & loaded:
            break
        if i.load_width == width and (guarded or not i.predicate):
            loaded.update(i.registers_loaded())
            issued += 1
    return issued


def facts_from_library(library, arch="sm_90", only=""):
    """{kernel key: KernelFacts} of every kernel in a built library (.so or object) whose name matches the
    regex `only`, read by sass.py."""
    import sass

    facts = {}
    for kernel in (k for k in sass.kernels(library, arch=arch) if re.search(only, k.name)):
        loop, width = stream_loop(kernel, sass), stream_width(kernel)
        if loop is None:
            facts[launch_plans.kernel_key(kernel.name)] = KernelFacts(kernel.registers, kernel.shared)
            continue
        facts[launch_plans.kernel_key(kernel.name)] = KernelFacts(
            kernel.registers, kernel.shared, loop.instructions, dict(loop.loads),
            dict(Counter(i.load_width for i in loop.path if i.load_width and not i.predicate)),
            stream_loads_before_use(loop, width, True), stream_loads_before_use(loop, width, False))
    return facts


def facts_from_json(path):
    def widths(counts):
        return {int(w): n for w, n in counts.items()}
    return {key: KernelFacts(**{**f, "loads": widths(f["loads"]), "unguarded_loads": widths(f["unguarded_loads"])})
            for key, f in json.loads(Path(path).read_text()).items()}


def load_facts(path):
    """Kernel facts from a library, or from a JSON summary written by --save-facts."""
    return facts_from_json(path) if str(path).endswith(".json") else facts_from_library(path)


def blocks_per_sm(gpu, facts, threads, dynamic_shared=0):
    """Resident blocks per SM: threads, registers (allocated per warp in units of 256), shared memory (1 KB
    reserved per block) and the block limit."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(facts.registers, 1) * 32 // 256) * 256
    shared = facts.shared + dynamic_shared
    return max(1, min(gpu.blocks_per_sm, gpu.threads_per_sm // (warps * 32),
                      gpu.registers_per_sm // (regs_per_warp * warps),
                      gpu.shared_per_sm // (shared + 1024) if shared else gpu.blocks_per_sm))


def stream_loads(facts, launch):
    """(stream loads per trip, of them in flight before the first use). The trip's loads at the stream
    width: the unguarded ones, or, where guards hide some of the row's streams (the dx pass's x), up to
    `launch.streams` of them all. Where the coefficients load at that width too (4-byte float), the
    per-channel coefficient loads (launch.coef_loads per vector) are taken out: they hit L1."""
    width = launch.vec_bytes
    every, unguarded = (facts.loads or {}).get(width, 0), (facts.unguarded_loads or {}).get(width, 0)
    if not every:
        return launch.streams, launch.streams
    trip = max(unguarded, min(every, launch.streams))
    before = max(facts.unguarded_before_use, min(facts.loads_before_use, launch.streams))
    if width == 4 and launch.coef_loads:
        trip = max(1, trip * launch.streams // (launch.streams + launch.coef_loads))
    return trip, max(1, min(before, trip))


def kernel_time(gpu, params, launch, facts):
    """Seconds for one launch: the launch overhead, the waves' streaming times and the serial tails."""
    if launch.kernel is None:
        return params.launch_s, {}
    threads = math.prod(launch.block)
    blocks = math.prod(launch.grid)
    moved = launch.reads + launch.writes
    per_sm = blocks_per_sm(gpu, facts, threads, launch.shared)
    slots = per_sm * gpu.sms
    trip_loads, in_flight_loads = stream_loads(facts, launch)
    in_flight = in_flight_loads * launch.vec_bytes          # bytes per thread
    amplify = moved / launch.reads                           # bytes moved per byte read

    # A warp's trip: its stream loads and stores, one L1 wavefront per 128 bytes (at least one an
    # instruction), and its coefficient loads, coef_lines each.
    trip_bytes = 32 * trip_loads * launch.vec_bytes               # read by a warp per trip
    vectors = trip_loads / launch.streams
    access_lines = max(1, 32 * launch.vec_bytes // 128)
    lines = access_lines * (trip_loads + vectors * launch.writes * launch.streams / launch.reads) \
        + vectors * launch.coef_loads * launch.coef_lines

    def rates(n):
        busy = min(n, gpu.sms)
        found = {"dram": gpu.ceiling(launch.reads, launch.writes),
                 "latency": n * threads * in_flight / params.latency_s * amplify,                  # Little's law
                 "lsu": busy * gpu.clock_hz * gpu.l1_lines_per_cycle * trip_bytes / lines * amplify}
        if facts.instructions:
            found["issue"] = busy * gpu.issue_per_cycle * gpu.clock_hz * trip_bytes / facts.instructions * amplify
        return found

    def rate(n):
        return min(rates(n).values())

    merge_s = MERGE_CYCLES[launch.welford] / gpu.clock_hz
    full, tail = divmod(blocks, slots)
    per_block = moved / blocks
    waves = [slots] * full + ([tail] if tail else [])
    stream_s = sum(n * per_block / rate(n) + launch.block_merges * merge_s for n in waves)
    # The last block, after every other: its chain over the partials, then its own block merges again.
    grid_tail_s = (launch.grid_merges * (launch.round_trips * gpu.l2_latency_s + merge_s)
                   + (launch.block_merges * merge_s if launch.grid_merges else 0))
    detail = dict(kernel=launch.kernel, grid=list(launch.grid), block=list(launch.block), blocks_per_sm=per_sm,
                  waves=round(blocks / slots, 2), bytes_in_flight_per_thread=in_flight,
                  bound=min(rates(min(blocks, slots)).items(), key=lambda kv: kv[1])[0],
                  gbps=round(moved / stream_s / 1e9, 1), grid_tail_us=round(grid_tail_s * 1e6, 2))
    return params.launch_s + stream_s + grid_tail_s, detail


def predict_row(gpu, params, row, plan, facts):
    """The row's predicted time, fraction of copy bandwidth (the benchmark's accounting) and per kernel."""
    total, kernels = 0.0, []
    for launch in plan:
        if launch.kernel and launch.kernel not in facts:
            raise KeyError(f"{launch.kernel} (launched for {row}) is not in the library's kernels; of its family: "
                           + ", ".join(k for k in facts if k.split("<")[0] == launch.kernel.split("<")[0]))
        seconds, detail = kernel_time(gpu, params, launch, facts[launch.kernel] if launch.kernel else None)
        total += seconds
        if detail:
            kernels.append(dict(detail, us=round(seconds * 1e6, 2)))
    fraction = PASSES[row.mode] * row.tensor_bytes / total / gpu.copy
    return dict(shape=list(row.shape), layout=row.layout, dtype=row.dtype, mode=row.mode,
                predicted_s=total, predicted_roofline=fraction, launches=len(plan), kernels=kernels,
                fits_in_l2=2 * row.tensor_bytes <= 50e6)


# --- Calibration on the H100 table ---------------------------------------------------------------------

_H100_MODES = {"train fwd": "train-fwd", "train fwd+bwd": "train-fwd-bwd", "eval fwd": "eval"}


def h100_rows():
    """(Row, measured fusedbn_roofline, copy bandwidth of the row) of the H100 tables (v1 kernels)."""
    out = []
    for path in H100_TABLES:
        for r in json.loads(path.read_text())["rows"]:
            row = Row(tuple(r["shape"]), r["layout"], r["dtype"], _H100_MODES[r["mode"]])
            out.append((row, r["fusedbn_roofline"], 2 * row.tensor_bytes / r["clone_s"]))
    return out


def h100_copy():
    return statistics.median(copy for _, _, copy in h100_rows())


def _errors(params, cases, facts):
    return [predict_row(H100, params, row, plan, facts)["predicted_roofline"] - measured
            for row, measured, plan in cases]


def calibrate(facts):
    """The Params minimizing the RMS error of the predicted fractions over the H100 table (v1 plans),
    by a grid over latency 0.3-2.0 us and launch overhead 0-20 us, then a finer one around the best."""
    cases = [(row, measured, launch_plans.v1_plan(row, H100.sms)) for row, measured, _ in h100_rows()]

    def rms(p):
        return math.sqrt(statistics.fmean(e * e for e in _errors(p, cases, facts)))

    best = min((Params(lat * 1e-7, lau * 1e-6) for lat in range(3, 21) for lau in range(0, 21)), key=rms)
    return min((Params(best.latency_s + i * 2e-9, max(0.0, best.launch_s + j * 2.5e-7))
                for i in range(-25, 26) for j in range(-4, 5)), key=rms)


def calibration_report(params, facts):
    """Per H100 row: measured and predicted fraction; the summary lines."""
    lines, rows = [], []
    for row, measured, _ in h100_rows():
        pred = predict_row(H100, params, row, launch_plans.v1_plan(row, H100.sms), facts)
        rows.append(dict(pred, measured_roofline=measured, error=pred["predicted_roofline"] - measured))
    within = sum(abs(r["error"]) <= 0.10 for r in rows)
    rms = math.sqrt(statistics.fmean(r["error"] ** 2 for r in rows))
    lines.append(f"PREDICTION vs H100 measurement (v1 kernels, ede88ac): {within}/{len(rows)} rows within 10 points, "
                 f"RMS error {rms * 100:.1f} points; latency {params.latency_s * 1e6:.3f} us, "
                 f"launch {params.launch_s * 1e6:.2f} us")
    for r in sorted(rows, key=lambda r: -abs(r["error"])):
        lines.append(f"  {'x'.join(map(str, r['shape'])):>16} {r['layout']} {r['dtype']:>8} {r['mode']:>13}: "
                     f"measured {r['measured_roofline']:.2f} predicted {r['predicted_roofline']:.2f} "
                     f"({r['error'] * 100:+.0f})")
    return rows, lines


# --- Predictions --------------------------------------------------------------------------------------


def preset_rows(shapes, dtypes, modes=MODES):
    """Rows of a shapes preset: both layouts (3-D inputs channels-first only)."""
    return [Row(tuple(shape), layout, dtype, mode) for dtype in dtypes for shape in shapes
            for layout in (("NCHW",) if len(shape) == 3 else ("NCHW", "NHWC")) for mode in modes]


def render(predictions, gpu, version, title):
    """A markdown table: one line per (shape, layout), the fraction of copy bandwidth per dtype and mode."""
    dtypes = list(dict.fromkeys(p["dtype"] for p in predictions))
    cols = [(d, m) for d in dtypes for m in MODES]
    cells = {(tuple(p["shape"]), p["layout"], p["dtype"], p["mode"]): p for p in predictions}
    keys = list(dict.fromkeys((tuple(p["shape"]), p["layout"]) for p in predictions))
    lines = [f"**PREDICTION ({title}): {gpu.name}, {version} kernels, fraction of copy bandwidth "
             f"({gpu.copy / 1e12:.2f} TB/s), not measured; in parentheses at a {SLOW_LATENCY_S * 1e6:.1f} us "
             "loaded latency**", "",
             "| shape | layout | " + " | ".join(f"{d} {m}" for d, m in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for shape, layout in keys:
        row = [f"{cells[key]['predicted_roofline'] * 100:.0f} % ({cells[key]['predicted_roofline_slow'] * 100:.0f})"
               if key in cells else "" for key in ((shape, layout, d, m) for d, m in cols)]
        lines.append(f"| {'x'.join(map(str, shape))} | {layout} | " + " | ".join(row) + " |")
    return lines


# The README shows the H100 table's five shapes; the files hold the whole preset.
README_SHAPES = [[256, 64, 112, 112], [256, 256, 56, 56], [256, 512, 28, 28], [256, 1024, 14, 14], [256, 2048, 7, 7]]
README_BEGIN, README_END = "<!-- gpu-model: results/model -->", "<!-- /gpu-model -->"


def readme_section(results=RESULTS):
    """benchmarks/README.md's block of predictions, rendered from the committed files in `results`."""
    lines = [README_BEGIN]
    for path in sorted(results.glob("prediction-h100-*-calibration.md")):
        lines += [path.read_text().splitlines()[0] + f" (`results/model/{path.name}`)", ""]
    for path in sorted(results.glob("prediction-h200-*.jsonl"), key=lambda p: ("anchors" in p.name, p.name)):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        if "resnet50" in path.name:
            records = [r for r in records if r["shape"] in README_SHAPES]
        title = path.stem.split("-")[-1] + (" preset, its H100 shapes" if "resnet50" in path.name else " preset")
        lines += render(records, H200, records[0]["kernels_version"], title)
        lines += ["", f"(`results/model/{path.name}`)", ""]
    return lines[:-1] + [README_END]


def update_readme(path):
    text = Path(path).read_text()
    before, rest = text.split(README_BEGIN)
    after = rest.split(README_END, 1)[1]
    Path(path).write_text(before + "\n".join(readme_section()) + after)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    parser.add_argument("--library", help="the built CUDA library (.so or object; its sm_90 SASS) or a "
                        "kernel-facts JSON (--save-facts)")
    parser.add_argument("--kernels-version", default="v2", help="a label, and which launches: v1 (written out in "
                        "launch_plans.py) or any later one (recorded by the emulator; default v2)")
    parser.add_argument("--simt-library", help="a directory holding the fusedbn package whose _simt records the "
                        "launches (default: this checkout's)")
    parser.add_argument("--shapes", choices=["resnet50", "anchors"], default="resnet50")
    parser.add_argument("--batch", type=int, default=256, help="N of the resnet50 preset")
    parser.add_argument("--dtype", help="comma-separated (default bfloat16,float32; float16 for anchors)")
    parser.add_argument("--calibrate", action="store_true", help="fit the free parameters on the H100 table "
                        "(v1 kernels: --kernels-version v1) and report the error per row")
    parser.add_argument("--latency-us", type=float, help="instead of the calibrated loaded DRAM latency")
    parser.add_argument("--launch-us", type=float, help="instead of the calibrated per-launch overhead")
    parser.add_argument("--save-facts", help="write the kernels' SASS facts as JSON (a --library for later)")
    parser.add_argument("--out", help="directory for the prediction files (default: print only)")
    parser.add_argument("--readme", help="rewrite this README's prediction block from benchmarks/results/model")
    args = parser.parse_args(argv)
    if not args.readme and not args.library:
        parser.error("--library is required")
    return args


def _write(out, stem, records, lines):
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.readme:
        update_readme(args.readme)
        return 0
    facts = load_facts(args.library)
    if args.save_facts:
        Path(args.save_facts).write_text(json.dumps({k: asdict(f) for k, f in sorted(facts.items())}, indent=0) + "\n")
    out = Path(args.out) if args.out else None
    if args.calibrate:
        params = calibrate(facts)
        rows, lines = calibration_report(params, facts)
        if out:
            _write(out, f"prediction-{args.gpu}-{args.kernels_version}-calibration", rows, lines)
        print("\n".join(lines))
        return 0
    # The emulator's fusedbn (--simt-library) is imported before bench_lib imports one (the checkout's).
    recorder = None if args.kernels_version == "v1" else launch_plans.simt_recorder(args.simt_library or ROOT.parent)
    sys.path += [str(ROOT), str(ROOT.parent)]
    import bench_lib

    gpu = GPUS[args.gpu]
    params = Params(CALIBRATED.latency_s if args.latency_us is None else args.latency_us * 1e-6,
                    CALIBRATED.launch_s if args.launch_us is None else args.launch_us * 1e-6)
    if args.shapes == "anchors":
        shapes, dtypes = bench_lib.ANCHOR_SHAPES, (args.dtype or "float16").split(",")
    else:
        shapes = [(args.batch, *chw) for chw in bench_lib.RESNET50_SHAPES]
        dtypes = (args.dtype or "bfloat16,float32").split(",")
    rows = preset_rows(shapes, dtypes)
    if args.kernels_version == "v1":
        plans = [launch_plans.v1_plan(row, gpu.sms) for row in rows]
    else:
        if args.kernels_version not in launch_plans.MERGE_TAILS:
            print(f"gpu_model: {args.kernels_version}'s serial merge tails taken as v2's (add its own to "
                  "launch_plans.MERGE_TAILS)", file=sys.stderr)
        plans = [launch_plans.recorded_plan(row, recorder, args.kernels_version) for row in rows]
    slow = replace(params, latency_s=SLOW_LATENCY_S)
    predictions = [dict(predict_row(gpu, params, row, plan, facts), gpu=gpu.name, kernels_version=args.kernels_version,
                        latency_us=params.latency_s * 1e6, launch_us=params.launch_s * 1e6, prediction=True,
                        predicted_roofline_slow=predict_row(gpu, slow, row, plan, facts)["predicted_roofline"])
                   for row, plan in zip(rows, plans)]
    title = f"{args.shapes} preset" + (f", batch {args.batch}" if args.shapes == "resnet50" else "")
    lines = render(predictions, gpu, args.kernels_version, title)
    if out:
        _write(out, f"prediction-{args.gpu}-{args.kernels_version}-{args.shapes}", predictions, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
