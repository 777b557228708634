"""benchmarks/gpu_model.py's plumbing, no timing: the calibration reproduces its committed PREDICTIONS from
the committed inputs (the v1 kernels' SASS facts, the H100 table), the v1 launch plan follows that
commit's host code, a kernel's SASS gives the facts the model reads, a kernel's time follows Little's law
and waves, the emulator's record becomes a plan, and the README shows the committed predictions."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_model  # noqa: E402
import launch_plans  # noqa: E402
import sass  # noqa: E402
from launch_plans import Launch, Row  # noqa: E402

MODEL = ROOT / "benchmarks" / "results" / "model"


@pytest.fixture(scope="module")
def v1_facts():
    return gpu_model.facts_from_json(MODEL / "v1-sass-facts.json")


def test_calibration_reproduces_the_committed_predictions(v1_facts):
    rows, lines = gpu_model.calibration_report(gpu_model.CALIBRATED, v1_facts)
    committed = [json.loads(line) for line in (MODEL / "prediction-h100-v1-calibration.jsonl").read_text().splitlines()]
    assert [(r["shape"], r["layout"], r["dtype"], r["mode"]) for r in rows] == \
        [(c["shape"], c["layout"], c["dtype"], c["mode"]) for c in committed]
    assert [r["predicted_roofline"] for r in rows] == \
        pytest.approx([c["predicted_roofline"] for c in committed], abs=1e-9)
    assert (MODEL / "prediction-h100-v1-calibration.md").read_text().splitlines() == lines
    assert gpu_model.H100_COPY == pytest.approx(gpu_model.h100_copy(), rel=1e-3)  # the table's own copies


def test_the_fit_gives_the_calibrated_parameters(v1_facts):
    fitted = gpu_model.calibrate(v1_facts)
    assert fitted.latency_s == pytest.approx(gpu_model.CALIBRATED.latency_s, rel=1e-6)
    assert fitted.launch_s == pytest.approx(gpu_model.CALIBRATED.launch_s, rel=1e-6)


def test_v1_plan_follows_its_host_code(v1_facts):
    """front.h at ede88ac: channels-first splits = min(ceil(4 * SMs / C), count / (threads * kVec * 4)),
    semaphores zeroed by a fill where split; elementwise min(ceil(vectors / 256), 8 * SMs) blocks."""
    plan = launch_plans.v1_plan(Row((256, 64, 112, 112), "NCHW", "float32", "train-fwd"), 132)
    assert [(launch.kernel, launch.grid, launch.block) for launch in plan] == [
        ("channels_first_reduce_kernel<WelfordReducer<float,float>,StatsFinisher<float,float>,4>", (64, 9, 1),
         (512, 1, 1)),
        (None, (1, 1, 1), (1, 1, 1)),
        ("elementwise_kernel<NormalizeOp<float,float>,4>", (1056, 1, 1), (256, 1, 1)),
        (None, (1, 1, 1), (1, 1, 1))]
    eval_nhwc = launch_plans.v1_plan(Row((256, 2048, 7, 7), "NHWC", "bfloat16", "eval"), 132)
    assert [launch.kernel for launch in eval_nhwc] == [None] * 3 + ["elementwise_kernel<NormalizeOp<BFloat16,float>,8>"]
    assert eval_nhwc[-1].coef_loads == 24 and eval_nhwc[-1].coef_lines == 8  # per lane, 256 channels a warp
    for row, _, _ in gpu_model.h100_rows():
        assert all(launch.kernel in v1_facts for launch in launch_plans.v1_plan(row, 132) if launch.kernel)


def test_kernel_names_meet():
    """The emulator's record names an enum argument by its enumerator, c++filt by a cast of its value."""
    recorded = ("fusedbn::cuda::k<NormalizeOp<c10::BFloat16, float, float, "
                "FixedActivation<fusedbn::Activation::kRelu> >, 8>; std::string = std::basic_string<char>")
    demangled = ("void fusedbn::cuda::k<fusedbn::cuda::NormalizeOp<c10::BFloat16, float, float, "
                 "fusedbn::cuda::FixedActivation<(fusedbn::Activation)1> >, 8>(fusedbn::cuda::NormalizeOp<"
                 "c10::BFloat16, float, float, fusedbn::cuda::FixedActivation<(fusedbn::Activation)1> >, long)")
    assert launch_plans.kernel_key(recorded) == launch_plans.kernel_key(demangled) == \
        "k<NormalizeOp<BFloat16,float,float,FixedActivation<kRelu>>,8>"


def _instructions(listing):
    """sass.Instructions from "address [guard] OPCODE operands" lines."""
    out = []
    for line in listing.strip().splitlines():
        address, rest = line.split(maxsplit=1)
        guard = rest.split()[0] if rest.startswith("@") else ""
        opcode, _, operands = rest.removeprefix(guard).strip().partition(" ")
        out.append(sass.Instruction(int(address, 16), guard, opcode, tuple(operands.split(", ")) if operands else ()))
    return tuple(out)


def test_facts_come_from_the_stream_loop(monkeypatch):
    """A bf16 kVec=1 kernel: its streaming loop loads 2-byte values (a coefficient at 4 bytes, a residual
    under a guard), a later loop merges 8-byte partials. The model takes the streaming loop (sass.hot_loop
    takes the widest loads') and counts the stream loads issued before one's value is used."""
    code = _instructions("""
        0100 LDG.E R20, desc[UR4][R2.64]
        0110 LDG.E.U16 R4, desc[UR4][R8.64]
        0120 @P0 LDG.E.U16 R5, desc[UR4][R10.64]
        0130 FMUL R16, R20, R20
        0140 FADD R6, R4, R16
        0150 STG.E.U16 desc[UR4][R8.64], R6
        0160 IADD3 R8, R8, 0x2, RZ
        0170 ISETP.NE.AND P1, PT, R8, R9, PT
        0180 @P1 BRA 0x100
        0190 LDG.E.64 R22, desc[UR4][R24.64]
        01a0 FADD R26, R22, R26
        01b0 @P2 BRA 0x190
        01c0 EXIT""")
    name = ("void fusedbn::cuda::channels_first_elementwise_kernel<fusedbn::cuda::NormalizeOp<c10::BFloat16, float, "
            "float>, 1>(fusedbn::cuda::NormalizeOp<c10::BFloat16, float, float>, long, long, long)")
    kernel = sass.Kernel("_Z1k", name, 40, 0, 0, 0, code)
    assert sass.hot_loop(kernel).start == 0x190
    monkeypatch.setattr(sass, "kernels", lambda library, arch="sm_90": [kernel])
    facts = gpu_model.facts_from_library("a library")
    assert facts == {"channels_first_elementwise_kernel<NormalizeOp<BFloat16,float,float>,1>": gpu_model.KernelFacts(
        registers=40, shared=0, instructions=9, loads={4: 1, 2: 2}, unguarded_loads={4: 1, 2: 1},
        loads_before_use=2, unguarded_before_use=1)}


def test_a_kernel_streams_at_the_least_of_its_limits():
    """512-thread blocks, 4 resident per SM, 16 bytes in flight a thread: Little's law below the read
    ceiling; with one SM's worth of blocks more, a second wave of one block per SM at its own rate."""
    gpu, params = gpu_model.H200, gpu_model.Params(latency_s=1e-6, launch_s=0.0)
    facts = gpu_model.KernelFacts(registers=32, shared=0, instructions=10, loads={16: 1}, unguarded_loads={16: 1},
                                  loads_before_use=1, unguarded_before_use=1)
    one_wave = Launch("k", (4 * 132, 1, 1), (512, 1, 1), reads=10**9)
    seconds, detail = gpu_model.kernel_time(gpu, params, one_wave, facts)
    little = 4 * 132 * 512 * 16 / 1e-6
    assert little < gpu.read and seconds == pytest.approx(1e9 / little)
    assert detail["bound"] == "latency" and detail["waves"] == 1
    tail = Launch("k", (5 * 132, 1, 1), (512, 1, 1), reads=10**9)
    per_block = 1e9 / (5 * 132)
    assert gpu_model.kernel_time(gpu, params, tail, facts)[0] == pytest.approx(
        4 * 132 * per_block / little + 132 * per_block / (little / 4))


def test_a_recorded_launch_becomes_a_plan():
    simt = pytest.importorskip("fusedbn._simt")
    if not hasattr(simt, "set_record_only"):
        pytest.skip("this fusedbn._simt records no launches")
    record = launch_plans.simt_recorder()
    row = Row((8, 64, 16, 16), "NCHW", "float32", "train-fwd-bwd")
    plan = launch_plans.recorded_plan(row, record, "v2")
    assert simt.device()["name"] == "small" and not simt.record_only()  # restored
    kernels = [launch for launch in plan if launch.kernel]
    assert kernels and all(launch.kernel.startswith("channels_first_") for launch in kernels)
    assert all(launch.reads in (row.tensor_bytes, 2 * row.tensor_bytes) for launch in kernels)
    assert sum(launch.writes for launch in kernels) == 2 * row.tensor_bytes  # y, then dx
    assert all(launch.vec_bytes == 16 for launch in kernels)  # float32, aligned, S >= 4
    assert len(plan) - len(kernels) == launch_plans.TORCH_LAUNCHES["train-fwd-bwd"]


def test_readme_shows_the_committed_predictions():
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert "\n".join(gpu_model.readme_section()) in readme
    assert all(line.startswith("**PREDICTION") for line in gpu_model.readme_section() if line.startswith("**"))
