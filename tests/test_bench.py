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


@pytest.mark.parametrize("argv", [["--shapes", "2,3,4"], ["--shapes", "2,0,4,4"], ["--shapes", "a,b,c,d"],
                                  ["--shapes", ";"], ["--mode", "train"], ["--layout", "nwhc"],
                                  ["--dtype", "int8"], ["--compare", "jit"], ["--workload", "bn+tanh"],
                                  ["--device", "cpu", "--cuda-graph"]])
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
                            "fusedbn_over_torch", "torch_peak_bytes", "fusedbn_peak_bytes"}
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
    assert all(r[f"{v}_s"] > 0 for r in rows for v in models.VARIANTS)
    assert "fuse_model fused (relu): 8, fused (add+relu): 8, converted: 4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        models.parse_args(["--inputs", "8by224"])


def test_readme_table_is_rendered_from_the_results():
    """benchmarks/README.md's table is what report.py renders from the committed results files:
    `python benchmarks/report.py --readme benchmarks/README.md` refreshes it."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    (begin, end), rendered = report.readme_table(text, ROOT / "benchmarks")
    assert text[begin:end] == rendered


def test_markdown_reads_old_and_new_results(tmp_path):
    old = dict(machine="GPU", torch="2.11", rows=[dict(shape=[2, 3, 4, 5], layout="NCHW", dtype="float32",
                                                       mode="train fwd+bwd", torch_s=2.0, fusedbn_s=1.0,
                                                       fusedbn_roofline=0.5)])
    (tmp_path / "old.json").write_text(json.dumps(old))
    table = report.markdown(["old.json"], tmp_path).splitlines()
    assert table[0] == "**GPU**, torch 2.11 (`old.json`):"
    assert table[1:] == ["", "| shape | layout | float32 train-fwd-bwd |", "|---|---|---|",
                         "| 2x3x4x5 | NCHW | 0.50, 50 % |"]


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
