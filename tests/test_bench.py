"""The benchmark command lines (benchmarks/): argument parsing, shape presets, byte accounting, the check,
output formats and benchmarks/README.md's generated table; tiny shapes and no assertions on timings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fusedbn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402
import bench_lib  # noqa: E402
import report  # noqa: E402
from bench_lib import DEFAULT_WORKLOADS, MODES, PASSES, WORKLOADS, Contender, Setup  # noqa: E402

TINY = "2,3,4,5;1,8,2,2"
FAST = ["--device", "cpu", "--shapes", TINY, "--workload", "bn", "--min-run-time", "0.002", "--rounds", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tests time nothing worth keeping; on one thread they do not stall when the machine is busy (a
    multi-threaded torch op waits for a scheduler tick whenever another process holds a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_presets_at_the_chosen_batch():
    args = bench.parse_args(["--device", "cpu", "--batch", "4"])
    assert args.shapes == [(4, *chw) for chw in bench_lib.RESNET50_SHAPES]
    assert bench.parse_args(["--device", "cuda"]).shapes[0][0] == 256  # the default batch follows the device
    quick = bench.parse_args(["--device", "cpu", "--quick"])
    assert quick.shapes == [(8, *chw) for chw in bench_lib.SMALL_SHAPES]
    assert quick.min_run_time < bench.parse_args([]).min_run_time


def test_resnet50_preset_is_resnet50():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
    seen = []
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[1:])))
    model(torch.empty(1, 3, 224, 224, device="meta"))
    assert bench_lib.RESNET50_SHAPES == list(dict.fromkeys(seen))


def test_explicit_shapes_layouts_modes_dtypes_anchors():
    args = bench.parse_args(["--shapes", "2,3,4,5; 1,8,2,2;", "--layout", "both", "--mode", "all",
                             "--dtype", "float32,bfloat16", "--compare", "eager,compile", "--no-check"])
    assert args.shapes == [(2, 3, 4, 5), (1, 8, 2, 2)]
    assert args.layouts == ["NCHW", "NHWC"] and args.mode == list(MODES)
    assert args.dtype == ["float32", "bfloat16"] and not args.check
    assert [a.name for a in args.anchors] == ["torch", "compile"]
    args = bench.parse_args(["--layout", "nhwc", "--mode", "eval,train-fwd", "--compare", "compile"])
    assert args.layouts == ["NHWC"] and args.mode == ["eval", "train-fwd"] and args.check
    assert [a.name for a in args.anchors] == ["torch", "compile"]  # eager is always the reference
    assert {s.workload.name for s in bench.setups(bench.parse_args(["--shapes", TINY, "--workload", "bn+relu"]))} \
        == {"bn+relu"}
    setups = list(bench.setups(bench.parse_args(["--device", "cpu", "--shapes", TINY, "--dtype", "float64,float16"])))
    assert len(setups) == 3 * 2 * 2 * 2  # workloads x dtypes x shapes x layouts
    assert {s.workload.name for s in setups} == {"bn", "bn+relu", "bn+add+relu"}
    assert {(s.dtype, s.param_dtype) for s in setups} == {(torch.float64, torch.float64),
                                                          (torch.float16, torch.float32)}


def test_anchors_preset_runs_3d_and_5d_inputs(monkeypatch, tmp_path):
    """--shapes anchors: whole shapes, not at --batch; a 3-D input (BatchNorm1d) runs channels-first only, a
    5-D one (BatchNorm3d) also channels-last-3d; float16 is checked and timed (tiny stand-ins here)."""
    assert bench.parse_args(["--shapes", "anchors", "--batch", "8"]).shapes == bench_lib.ANCHOR_SHAPES
    assert [len(s) for s in bench_lib.ANCHOR_SHAPES] == [4, 3, 5]
    monkeypatch.setitem(bench_lib.FIXED_PRESETS, "anchors", [(2, 3, 8), (2, 4, 2, 3, 4)])
    path = tmp_path / "anchors.json"
    assert bench.main(["--device", "cpu", "--shapes", "anchors", "--dtype", "float16", "--workload", "bn",
                       "--mode", "train-fwd-bwd", "--min-run-time", "0.002", "--rounds", "1",
                       "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["shape"], r["layout"], r["dtype"]) for r in rows] == [
        ([2, 3, 8], "NCHW", "float16"), ([2, 4, 2, 3, 4], "NCHW", "float16"), ([2, 4, 2, 3, 4], "NHWC", "float16")]
    x = Setup((2, 4, 2, 3, 4), "NHWC", torch.float16, torch.float32, "cpu").make_tensors()[0]
    assert x.is_contiguous(memory_format=torch.channels_last_3d)


def test_unet3d_preset_is_batchnorm3d_at_batch_2():
    """--shapes unet3d: 5-D shapes at N=2 unless --batch says otherwise, timed as nn.BatchNorm3d against
    fusedbn's 3-D modules, NHWC as channels-last-3d."""
    args = bench.parse_args(["--device", "cpu", "--shapes", "unet3d", "--layout", "nhwc", "--workload", "all"])
    assert args.shapes == [(2, *sample) for sample in bench_lib.UNET3D_SHAPES] and len(args.shapes) == 8
    assert bench.parse_args(["--shapes", "unet3d", "--batch", "4"]).shapes[0] == (4, 16, 32, 32, 32)
    assert bench.parse_args(["--device", "cpu"]).shapes[0][0] == 8  # other presets keep the device's batch
    assert {shape[1] for shape in args.shapes} == {16, 32, 64, 128}
    assert {shape[2:] for shape in args.shapes} == {(s, s, s) for s in (32, 16, 8, 4)}
    setups = list(bench.setups(args))
    assert {s.layout for s in setups} == {"NHWC"} and len(setups) == len(WORKLOADS) * 8
    fused_class = {"identity": fusedbn.FusedBatchNorm3d, "relu": fusedbn.FusedBatchNormReLU3d}
    for setup in setups[:: len(args.shapes)]:  # the first shape of each workload
        x, _, residual = setup.make_tensors()
        assert x.is_contiguous(memory_format=torch.channels_last_3d) and x.dim() == 5
        modules = bench_lib.build_modules(setup, [bench_lib.ANCHORS["eager"]] + bench_lib.OURS, residual)
        assert type(modules["torch"].bn) is nn.BatchNorm3d
        assert type(modules["fusedbn"].bn) is fused_class.get(setup.workload.activation, fusedbn.FusedBatchNormAct3d)
    assert bench_lib.ANCHORS["eager"].describe(args.shapes).startswith("eager nn.BatchNorm3d ")
    assert "FusedBatchNormReLU1d/3d" in bench_lib.OURS[0].describe([(2, 3), (2, 3, 4, 4, 4)])


def test_unet3d_preset_is_the_unet_of_models_py():
    """The preset is the BatchNorm3d inputs of 16-128 channels of models.py's unet3d at 64^3, then 32^3."""
    pytest.importorskip("monai")
    import models

    with torch.device("meta"):
        model = models.UNET3D.build()
    seen = []
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[1:])))
    for side in (64, 32):
        model(torch.empty(2, 1, side, side, side, device="meta"))
    assert bench_lib.UNET3D_SHAPES == [shape for shape in dict.fromkeys(seen) if shape[0] >= 16]


def test_verdict_from_interleaved_round_ranges(monkeypatch):
    """faster: ours' slowest round beats the anchor's best; slower: ours' best loses to the anchor's
    slowest; otherwise the ranges overlap and it is a tie (even at a ratio of 1.05)."""
    def rounds_row(ours_rounds, torch_rounds):
        return {f"{name}_{key}": value for name, rounds in (("fusedbn", ours_rounds), ("torch", torch_rounds))
                for key, value in (("s", min(rounds)), ("spread", max(rounds) / min(rounds) - 1))}

    cases = {"faster": ([1.0, 1.1, 1.05], [1.2, 1.3, 1.25]), "slower": ([1.4, 1.5], [1.2, 1.3]),
             "tie": ([1.05, 1.1], [1.0, 1.2])}
    for expected, (ours_rounds, torch_rounds) in cases.items():
        assert report.verdict((min(ours_rounds), max(ours_rounds)), (min(torch_rounds), max(torch_rounds))) \
            == expected
        assert report.verdict_of(rounds_row(ours_rounds, torch_rounds), "fusedbn", "torch") == expected
    assert report.verdict((1.0, 1.0), (1.0, 1.0)) == "tie"  # touching ranges are not apart
    assert report.verdict_of(dict(fusedbn_s=1.0, torch_s=2.0), "fusedbn", "torch") is None  # an old file
    # measure() stores it per anchor: the copy, torch, fusedbn (best, spread) as interleaved_medians gives them.
    monkeypatch.setattr(bench_lib, "interleaved_medians", lambda fns, *_: ([1e-3, 2e-3, 2.1e-3], [0.0, 0.1, 0.1]))
    setup = Setup((2, 3, 4, 4, 4), "NHWC", torch.float32, torch.float32, "cpu")
    x, grad, residual = setup.make_tensors()
    contenders = [bench_lib.ANCHORS["eager"]] + bench_lib.OURS
    modules = bench_lib.build_modules(setup, contenders, residual)
    row = bench_lib.measure(setup, modules, contenders[:1], bench_lib.OURS, x, grad, residual, "eval", 0.001, 2)
    assert row["fusedbn_over_torch"] == pytest.approx(1.05) and row["fusedbn_vs_torch"] == "tie"


def test_5d_and_1d_shapes_end_to_end(tmp_path, capsys):
    """Explicit N,C,D,H,W (both layouts), N,C and N,C,L shapes: checked against torch's BatchNorm of their
    rank, timed, and the verdict in every output."""
    paths = {kind: tmp_path / f"out.{kind}" for kind in ("json", "csv", "txt")}
    assert bench.main(["--device", "cpu", "--shapes", "2,4,3,3,3;3,5;2,3,7", "--workload", "bn,bn+add+prelu",
                       "--mode", "train-fwd-bwd", "--min-run-time", "0.002", "--rounds", "2",
                       "--json", str(paths["json"]), "--csv", str(paths["csv"]),
                       "--full-table", str(paths["txt"])]) == 0
    data = json.loads(paths["json"].read_text())
    assert [(r["workload"], r["shape"], r["layout"]) for r in data["rows"]] == [
        (workload, shape, layout) for workload in ("bn", "bn+add+prelu")
        for shape, layout in (([2, 4, 3, 3, 3], "NCHW"), ([2, 4, 3, 3, 3], "NHWC"), ([3, 5], "NCHW"),
                              ([2, 3, 7], "NCHW"))]
    assert data["contenders"]["torch"].startswith("eager nn.BatchNorm1d/3d ")
    assert all(r["fusedbn_vs_torch"] in ("faster", "tie", "slower") and r["fusedbn_peak_bytes"] for r in data["rows"])
    csv_lines = paths["csv"].read_text().splitlines()
    assert "fusedbn_vs_torch" in csv_lines[0].split(",") and csv_lines[1].startswith("bn,2x4x3x3x3,NCHW,")
    table = paths["txt"].read_text()
    assert "fusedbn vs torch" in table and "verdict (fusedbn vs torch)" in table
    summary = capsys.readouterr().out.splitlines()[-9:-1]
    assert [line.split()[1:3] for line in summary[:4]] == [["2x4x3x3x3", "NCHW"], ["2x4x3x3x3", "NHWC"],
                                                          ["3x5", "NCHW"], ["2x3x7", "NCHW"]]


@pytest.mark.parametrize("argv", [["--shapes", "2"], ["--shapes", "1,2,3,4,5,6"], ["--shapes", "2,0,4,4"],
                                  ["--shapes", "a,b,c,d"], ["--shapes", ";"], ["--mode", "train"], ["--layout", "nwhc"],
                                  ["--dtype", "int8"], ["--compare", "jit"], ["--workload", "bn+tanh"],
                                  ["--device", "cpu", "--cuda-graph"],
                                  ["--distributed", "2", "--shapes", "2,4,3,3,3"]])
def test_bad_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_byte_accounting(dtype, workload):
    setup = Setup((2, 3, 4, 5), "NHWC", dtype, torch.float32, "cpu", WORKLOADS[workload])
    assert PASSES == {"train-fwd": 3, "train-fwd-bwd": 8, "eval": 2}
    expected_passes = {"train-fwd": 4, "train-fwd-bwd": 12, "eval": 3} if WORKLOADS[workload].residual else PASSES
    for mode, passes in expected_passes.items():
        assert bench_lib.passes(setup, mode) == passes
        assert bench_lib.tensor_bytes(setup, passes) == passes * 120 * dtype.itemsize
    x, grad, residual = setup.make_tensors()
    assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
    modules = bench_lib.build_modules(setup, [bench_lib.ANCHORS["eager"]] + bench_lib.OURS, residual)
    row = bench_lib.measure(setup, modules, [bench_lib.ANCHORS["eager"]], bench_lib.OURS, x, grad, residual, "eval",
                            0.002, 1)
    assert row["workload"] == workload and row["passes"] == expected_passes["eval"]
    assert row["bytes"] == expected_passes["eval"] * 120 * dtype.itemsize
    assert row["copy_gbps"] == pytest.approx(2 * 120 * dtype.itemsize / row["copy_s"] / 1e9)
    for name in ("torch", "fusedbn"):
        assert row[f"{name}_gbps"] == pytest.approx(row["bytes"] / row[f"{name}_s"] / 1e9)
        assert row[f"{name}_roofline"] == pytest.approx(row[f"{name}_gbps"] / row["copy_gbps"])
        assert row[f"{name}_peak_bytes"] is None  # only training-step rows
    assert row["fusedbn_over_torch"] == pytest.approx(row["fusedbn_s"] / row["torch_s"])


def test_saved_bytes_count_each_storage_once():
    class Square(nn.Module):
        def forward(self, x):
            return x * x  # saves x twice

    x = torch.randn(2, 3, 4, 5)
    assert bench_lib.training_step_peak_bytes(Square(), x, torch.ones_like(x)) == 120 * 4
    bn = nn.BatchNorm2d(3)  # saves the input, weight, running and batch statistics
    assert 120 * 4 < bench_lib.training_step_peak_bytes(bn, x, torch.ones_like(x)) < 120 * 4 + 6 * 3 * 4 + 1


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_check_finds_a_wrong_contender(workload):
    setup = Setup((2, 3, 4, 5), "NCHW", torch.float32, torch.float32, "cpu", WORKLOADS[workload])
    x, grad, residual = setup.make_tensors()
    good = bench_lib.build_modules(setup, [bench_lib.ANCHORS["eager"]] + bench_lib.OURS, residual)
    assert bench_lib.check(setup, good, x, grad, residual, "torch") == []
    wrong = Contender("wrong-eps", "eps 0.5", lambda c, device, dtype, workload, residual: bench_lib.Composition(
        nn.BatchNorm2d(c, eps=0.5, device=device, dtype=dtype), workload, False, residual))
    bad = bench_lib.build_modules(setup, [bench_lib.ANCHORS["eager"], wrong], residual)
    mismatches = bench_lib.check(setup, bad, x, grad, residual, "torch")
    assert mismatches and all(m.startswith(f"wrong-eps {workload} 2x3x4x5 NCHW float32") for m in mismatches)
    assert any("grad_input" in m for m in mismatches)
    compared = bench_lib._check_results(good["torch"], x, grad, residual)
    assert ("grad_residual" in compared) == WORKLOADS[workload].residual


def test_check_failure_stops_the_run(monkeypatch, capsys):
    wrong = Contender("wrong", "momentum 0.5", lambda c, device, dtype, workload, residual: bench_lib.Composition(
        nn.BatchNorm2d(c, momentum=0.5, device=device, dtype=dtype), workload, False, residual))
    monkeypatch.setattr(bench, "OURS", [wrong])
    assert bench.main(FAST) == 1
    captured = capsys.readouterr()
    assert "--check failed" in captured.err and "running_mean" in captured.err
    assert "wrong ms" not in captured.out  # nothing was timed


def test_outputs(tmp_path, capsys):
    paths = {kind: tmp_path / f"out.{kind}" for kind in ("json", "csv", "png")}
    assert bench.main(FAST + ["--json", str(paths["json"]), "--csv", str(paths["csv"]),
                              "--plot", str(paths["png"])]) == 0
    out = capsys.readouterr().out.splitlines()
    # Piped: the header, then plain aligned text, a line per row.
    assert out[0].startswith("fusedbn benchmark on ") and "threads" in out[0] and torch.__version__ in out[0]
    assert "bn: train-fwd 3, train-fwd-bwd 8, eval 2" in out[1]
    table = out[out.index("") + 1:]
    assert table[0].split()[:5] == ["workload", "shape", "layout", "dtype", "mode"] and "fusedbn/torch" in table[0]
    assert len(table) == 1 + 2 * 2 * 3 and len({len(line) for line in table}) == 1

    data = json.loads(paths["json"].read_text())
    assert {"machine", "device", "torch", "fusedbn", "threads", "passes", "anchors", "ours", "rows"} <= set(data)
    rows = data["rows"]
    assert len(rows) == 12 and [r["mode"] for r in rows[:3]] == list(MODES)
    assert set(rows[0]) == {"workload", "shape", "layout", "dtype", "param_dtype", "mode", "passes", "bytes", "cuda_graph", "copy_s",
                            "copy_gbps", "copy_spread", "unsteady", "torch_s", "torch_spread", "torch_gbps",
                            "torch_roofline", "fusedbn_s", "fusedbn_spread", "fusedbn_gbps", "fusedbn_roofline",
                            "fusedbn_over_torch", "fusedbn_vs_torch", "torch_peak_bytes", "fusedbn_peak_bytes"}
    assert all(r["fusedbn_vs_torch"] in ("faster", "tie", "slower") for r in rows)
    assert all((r["fusedbn_peak_bytes"] is not None) == (r["mode"] == "train-fwd-bwd") for r in rows)

    csv_lines = paths["csv"].read_text().splitlines()
    assert csv_lines[0].split(",") == list(rows[0]) and len(csv_lines) == 13
    assert csv_lines[1].startswith("bn,2x3x4x5,NCHW,float32,float32,train-fwd,3,")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spread_and_unsteady_rows(monkeypatch):
    """Each figure's spread is its slowest round over its best; a copy that moved by more than
    UNSTEADY_COPY between rounds flags the row."""
    best, spreads = bench_lib.interleaved_medians([lambda: None, lambda: sum(range(100))], 0.002, 2)
    assert all(t > 0 for t in best) and all(s >= 0 for s in spreads)
    # The copy's rounds 50 % apart, the contender's 10 %.
    monkeypatch.setattr(bench_lib, "interleaved_medians", lambda fns, *_: ([1e-3, 2e-3], [0.5, 0.1]))
    setup = bench_lib.Setup((2, 3, 4, 5), "NCHW", torch.float32, torch.float32, "cpu", WORKLOADS["bn"])
    x, grad, residual = setup.make_tensors()
    anchor = bench.ANCHORS["eager"]
    modules = bench_lib.build_modules(setup, [anchor], residual)
    row = bench_lib.measure(setup, modules, [anchor], [], x, grad, residual, "eval", 0.001, 2)
    assert row["copy_spread"] == 0.5 and row["unsteady"] and row["torch_spread"] == 0.1
    monkeypatch.setattr(bench_lib, "interleaved_medians", lambda fns, *_: ([1e-3, 2e-3], [0.1, 0.1]))
    assert not bench_lib.measure(setup, modules, [anchor], [], x, grad, residual, "eval", 0.001, 2)["unsteady"]


def test_full_table_file_and_summary(tmp_path, capsys):
    path = tmp_path / "table.txt"
    assert bench.main(FAST + ["--layout", "nchw", "--full-table", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    summary = out[out.index("") + 1:]
    assert summary[-1] == f"(full table: {path})" and len(summary) == 1 + 3 * len(TINY.split(";"))
    assert all("fusedbn/torch" in line and "% of roofline" in line and "spread" in line for line in summary[:-1])
    assert all(line.split()[7] in ("faster", "tie", "slower") for line in summary[:-1])  # after the ratio
    table = path.read_text().splitlines()
    assert table[0].startswith("fusedbn benchmark on ") and any("spread %" in line for line in table)


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "quick.json"
    env = dict(os.environ, PYTHONPATH=str(Path(fusedbn.__file__).parents[1]))  # the fusedbn under test
    # --quick's shapes at batch 2, and timed shorter still: this checks the run, not the machine.
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--device", "cpu", "--batch", "2",
               "--min-run-time", "0.005", "--rounds", "1", "--threads", "1", "--json", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(DEFAULT_WORKLOADS) * len(bench_lib.SMALL_SHAPES) * 2 * 3
    assert all(r["fusedbn_s"] > 0 and r["torch_s"] > 0 for r in rows)
    assert {r["workload"] for r in rows} == set(DEFAULT_WORKLOADS)


@pytest.mark.slow  # torch.compile: about 20 s with a cold inductor cache
def test_compile_anchor(tmp_path):
    out = tmp_path / "compile.json"
    assert bench.main(["--device", "cpu", "--shapes", "2,3,4,5", "--layout", "nchw", "--workload", "bn,bn+add+relu",
                       "--compare", "eager,compile",
                       "--min-run-time", "0.002", "--rounds", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["anchors"] == ["torch", "compile"]
    assert all(r["compile_s"] > 0 and r["fusedbn_over_compile"] > 0 for r in data["rows"])


@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse"])
def test_resnet_losses_agree(capsys, fuse):
    pytest.importorskip("torchvision")
    import resnet

    assert resnet.main(["--model", "resnet18", "--device", "cpu", "--batch", "4", "--image-size", "32",
                        "--steps", "2", "--min-run-time", "0.01", "--rounds", "1"]
                       + (["--fuse", "--autocast", "bfloat16"] if fuse else [])) == 0
    out = capsys.readouterr().out
    assert "largest difference" in out and "training step" in out and "inference" in out
    assert ("fused (relu): 8, fused (add+relu): 8" in out) == fuse
    assert ("bfloat16 autocast, median time" in out) == fuse


def test_whole_model_rows(tmp_path, capsys):
    """benchmarks/models.py: a row per thread count and task with the three variants' times, and the
    JSON rewritten as rows land (eager only: compiling a network takes minutes on this CPU)."""
    pytest.importorskip("torchvision")
    import models

    out = tmp_path / "models.json"
    assert models.main(["--models", "resnet18", "--inputs", "2x32", "--threads", "1", "--compile", "eager",
                        "--min-run-time", "0.01", "--rounds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["task"], r["threads"], r["mode"]) for r in rows] == [("train", 1, "eager"), ("infer", 1, "eager")]
    assert all(r[f"{v}_s"] > 0 and r[f"{v}_spread"] >= 0 for r in rows for v in models.VARIANTS)
    assert all(r[f"{v}_vs_torch"] in ("faster", "tie", "slower") for r in rows for v in ("convert", "fuse"))
    assert "fuse_model fused (relu): 8, fused (add+relu): 8, converted: 4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        models.parse_args(["--inputs", "8by224"])


def test_unet3d_variants_agree_in_float64():
    """models.py's unet3d (MONAI's UNet) and its convert_model and fuse_model copies, channels-last-3d: the
    same loss and, after an SGD step, the same eval output, in float64."""
    pytest.importorskip("monai")
    import models

    assert models.parse_args(["--models", "unet3d"]).inputs is None  # its own default inputs
    assert models.UNET3D.default_inputs == ((2, 32), (2, 64))
    assert models.network("resnet50").default_inputs == ((8, 224), (32, 64))
    variants, fuse_report = models.build_variants(models.UNET3D, torch.channels_last_3d)
    assert "fused (prelu): 13" in str(fuse_report)
    volumes, labels = models.UNET3D.example(1, 16, torch.Generator().manual_seed(1))
    assert volumes.shape == (1, 1, 16, 16, 16) and labels.shape == (1, 16, 16, 16)
    volumes = volumes.double().to(memory_format=torch.channels_last_3d)
    losses, outputs = {}, {}
    for name, model in variants.items():
        model.double().train()
        losses[name] = models.make_task("train", model, volumes, labels)().item()
        outputs[name] = models.make_task("infer", model.eval(), volumes, labels)()
    assert outputs["torch"].shape == (1, 2, 16, 16, 16)
    for name in ("convert", "fuse"):
        assert losses[name] == pytest.approx(losses["torch"], rel=1e-10)
        torch.testing.assert_close(outputs[name], outputs["torch"], rtol=1e-9, atol=1e-9)


def test_unet3d_rows_and_missing_monai(tmp_path, capsys, monkeypatch):
    pytest.importorskip("monai")
    import models

    out = tmp_path / "unet3d.json"
    assert models.main(["--models", "unet3d", "--inputs", "1x16", "--threads", "1", "--compile", "eager",
                        "--tasks", "train", "--channels-last", "--min-run-time", "0.01", "--rounds", "2",
                        "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["layout"] == "NHWC"
    [row] = data["rows"]
    assert (row["model"], row["batch"], row["image_size"], row["task"]) == ("unet3d", 1, 16, "train")
    assert {row["convert_vs_torch"], row["fuse_vs_torch"]} <= {"faster", "tie", "slower"}
    assert "convert vs torch" in capsys.readouterr().out
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        models.parse_args(["--models", "unet3d"])
    assert "needs MONAI" in capsys.readouterr().err


def test_readme_table_is_rendered_from_the_results():
    """benchmarks/README.md's table is what report.py renders from the committed results files:
    `python benchmarks/report.py --readme benchmarks/README.md` refreshes it."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    (begin, end), rendered = report.readme_table(text, ROOT / "benchmarks")
    assert text[begin:end] == rendered


def test_markdown_reads_old_and_new_results(tmp_path):
    """Files of older runs lack the spreads, and say so; in newer ones a tie is marked, a clear loss not."""
    old = dict(machine="GPU", torch="2.11", rows=[dict(shape=[2, 3, 4, 5], layout="NCHW", dtype="float32",
                                                       mode="train fwd+bwd", torch_s=2.0, fusedbn_s=1.0,
                                                       fusedbn_roofline=0.5)])
    (tmp_path / "old.json").write_text(json.dumps(old))
    table = report.markdown(["old.json"], tmp_path).splitlines()
    assert table[0] == "**GPU**, torch 2.11 (`old.json`; no spreads recorded, ties not marked):"
    assert table[1:] == ["", "| shape | layout | float32 train-fwd-bwd |", "|---|---|---|",
                         "| 2x3x4x5 | NCHW | 0.50, 50 % |"]
    new_rows = [dict(old["rows"][0], layout=layout, mode="eval", workload="bn", torch_s=1.0, torch_spread=0.1,
                     fusedbn_s=fusedbn_s, fusedbn_spread=0.1) for layout, fusedbn_s in (("NCHW", 1.05), ("NHWC", 1.2))]
    (tmp_path / "new.json").write_text(json.dumps(dict(old, machine="CPU", threads=2, rows=new_rows)))
    table = report.markdown(["new.json"], tmp_path).splitlines()
    assert table[0] == "**CPU**, threads: 2, torch 2.11 (`new.json`):"
    assert table[4:] == ["| 2x3x4x5 | NCHW | 1.05 tie, 50 % |", "| 2x3x4x5 | NHWC | 1.20, 50 % |"]


@pytest.mark.slow  # gloo processes
def test_distributed_rows(tmp_path, capsys):
    out = tmp_path / "distributed.json"
    assert bench.main(["--distributed", "2", "--shapes", "2,4,3,3", "--layout", "nchw", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FusedSyncBatchNorm, 2 gloo processes" in printed and "bytes sent per step" in printed
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["world"] == 2 and rows[0]["fusedbn_synced_s"] > 0
    # packed moments (count, mean and M2 of 4 channels, float64) + two float32 sums per channel
    assert rows[0]["bytes_sent"] == 8 * (1 + 2 * 4) + 2 * 4 * 4
