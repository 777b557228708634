"""`python -m fusedbn` / fusedbn.info(): what it reports, its exit status, and the error a GPU outside the
build's architectures gets (fusedbn/_info.py, csrc/cuda_archs.h).

The architectures are checked against the machine code in fusedbn._C itself (cuobjdump, benchmarks/sass.py);
a GPU's capability is mocked, since no GPU need be present.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedbn
from fusedbn import _info as info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sass  # noqa: E402


def run_module(*prelude: str) -> subprocess.CompletedProcess:
    """`python -m fusedbn` in a fresh interpreter, after the statements in `prelude`."""
    code = "; ".join(prelude + ("import runpy", "runpy.run_module('fusedbn', run_name='__main__')"))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_python_m_fusedbn_reports_the_build_and_passes_its_check():
    run = run_module()
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert re.search(rf"^fusedbn\s+{re.escape(fusedbn.__version__)}$", out, re.M)
    assert re.search(rf"^torch\s+{re.escape(torch.__version__)} \(CUDA ", out, re.M)
    assert re.search(rf"^CPU kernels\s+{fusedbn.ops.cpu_build} \(", out, re.M)
    assert re.search(r"^threads\s+\d+$", out, re.M)
    assert re.search(r"^CUDA kernels\s+(built for \S+|not built)", out, re.M)
    assert re.search(r"^check cpu\s+ok: fusedbn and nn.BatchNorm2d differ by \S+ of each result's scale over a "
                     r"training step \(limit 1e-05\)", out, re.M)


def test_exit_status_is_1_when_the_self_check_fails():
    # nn.BatchNorm2d, the check's reference, made to disagree: FusedBatchNorm2d has its own forward.
    run = run_module("import torch", "forward = torch.nn.BatchNorm2d.forward",
                     "torch.nn.BatchNorm2d.forward = lambda self, x: forward(self, x) + 1e-3")
    assert run.returncode == 1, run.stdout + run.stderr
    # 1e-3 over the output's largest magnitude, 7.2
    assert re.search(r"^check cpu\s+FAILED: fusedbn and nn.BatchNorm2d differ by 1\.4e-04 of", run.stdout, re.M)


def test_check_device_compares_a_training_step():
    result = info.check_device(torch.device("cpu"))
    assert result["ok"] and 0 <= result["difference"] <= 1e-5


def built_codes(kind: str) -> set:
    """The architectures of fusedbn._C's embedded machine code (kind "elf": sm_XY) or PTX ("ptx": compute_XY)."""
    try:
        tool = sass.cuobjdump_path()
    except FileNotFoundError as e:  # no triton, which ships cuobjdump
        pytest.skip(str(e))
    listing = subprocess.run([tool, f"--list-{kind}", fusedbn._C.__file__], capture_output=True, text=True).stdout
    return set(re.findall(r"\.sm_(\w+)\.(?:cubin|ptx)", listing))


def test_the_architectures_reported_are_those_in_the_library():
    codes = info.cuda_archs().split(",") if info.cuda_archs() else []
    assert {c[len("sm_"):] for c in codes if c.startswith("sm_")} == built_codes("elf")
    assert {c[len("compute_"):] for c in codes if c.startswith("compute_")} == built_codes("ptx")


BUILT = "sm_80,sm_90,compute_90"


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_a_gpu_the_build_covers_gets_no_message(capability):
    # sm_80 runs on 8.x; compute_90's PTX on 9.0 and later.
    assert torch.ops.fusedbn._unsupported_gpu_message(BUILT, *capability, "GPU") == ""


@pytest.mark.parametrize("archs, capability, arch_list", [
    (BUILT, (7, 5), "7.5;8.0;9.0+PTX"),
    ("sm_80,sm_90", (10, 0), "8.0;9.0;10.0"),
    ("sm_90a", (9, 9), "9.0a;9.9"),
    ("compute_90", (8, 6), "8.6;9.0+PTX"),
])
def test_a_gpu_outside_the_build_is_told_what_to_rebuild_with(archs, capability, arch_list):
    message = torch.ops.fusedbn._unsupported_gpu_message(archs, *capability, "Some GPU")
    assert f"built for {archs} (TORCH_CUDA_ARCH_LIST), none of which runs on Some GPU" in message
    assert f"(compute capability {capability[0]}.{capability[1]})" in message
    assert f'TORCH_CUDA_ARCH_LIST="{arch_list}" pip install --no-build-isolation .' in message


def test_info_names_an_unsupported_gpu_and_fails(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    monkeypatch.setattr(info, "_has_cuda_kernels", lambda: True)
    monkeypatch.setattr(info, "cuda_archs", lambda: BUILT)
    assert info.info() is False
    out = capsys.readouterr().out
    assert re.search(r"^GPU 0\s+Tesla T4, compute capability 7\.5$", out, re.M)
    assert re.search(r'^check cuda:0\s+FAILED: .*runs on Tesla T4 .*TORCH_CUDA_ARCH_LIST="7.5;8.0;9.0\+PTX"', out,
                     re.M)
    assert re.search(r"^check cpu\s+ok", out, re.M)  # the CPU still checked
