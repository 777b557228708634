"""Builds fusedbn._C (the ops' schemas and meta kernels; the CUDA kernels when torch has CUDA and nvcc is
found) and the CPU kernels, fusedbn._cpu_<build>.

FUSEDBN_CUDA=auto (default) | 1 (require CUDA, fail without it) | 0 (CPU only).
FUSEDBN_SIMT=1 also builds fusedbn._simt, the test-only library that runs the CUDA kernel source on the
CPU under the SIMT emulator (csrc/simt); `make test` sets it.
FUSEDBN_CPU_ARCH=native (or any -march value) builds the CPU kernels once, fusedbn._cpu_native, tuned for
one machine (the Makefile's local build does). Unset, the build is portable: on x86-64 one build per
instruction set torch dispatches its own CPU kernels on (_cpu_default: baseline x86-64; _cpu_avx2;
_cpu_avx512, with torch's flags for each), fusedbn/ops.py loading the best the CPU runs, as torch chooses
(torch.backends.cpu.get_cpu_capability(); ATEN_CPU_CAPABILITY=default|avx2|avx512 overrides it); elsewhere
one baseline build. A _cpu_native left in an in-place tree is preferred: `make clean` removes it.
The CPU kernels' at::parallel_for uses torch's parallel backend: with OpenMP (torch's Linux wheels), it is
inlined into our code and runs in parallel only if compiled with -fopenmp, which every build path here
adds (it then shares the OpenMP runtime torch loaded, so torch.set_num_threads applies).
TORCH_CUDA_ARCH_LIST is honoured; without it and without a visible GPU, sm_80 and sm_90 are built.
The architectures built are compiled into fusedbn._C (FUSEDBN_CUDA_ARCHS), which names them when a GPU
outside them is used and in `python -m fusedbn`.
The extensions build concurrently, each in its own build directory, with at most MAX_JOBS compilers at once
(default: one per core), and each prints its build time.
"""
import copy
import glob
import os
import platform
import re
import sys
import time

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    mode = os.environ.get("FUSEDBN_CUDA", "auto")
    if mode == "0":
        return False
    import torch

    home = cpp_extension.CUDA_HOME
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch has no CUDA")
    if home is None or not os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
        reasons.append(f"no CUDA toolkit at CUDA_HOME={home} (set CUDA_HOME to the directory holding bin/nvcc)")
    if reasons and mode == "1":
        raise RuntimeError("FUSEDBN_CUDA=1 but " + "; ".join(reasons))
    if reasons:
        print("fusedbn: building the CPU kernels only: " + "; ".join(reasons))
    return not reasons


def openmp_flags():
    """The compiler and linker flag that makes at::parallel_for parallel where torch's backend is OpenMP."""
    import torch

    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []  # the native thread pool (or TBB): at::parallel_for calls into libtorch, no flag needed
    if sys.platform == "darwin":
        print("fusedbn: torch uses OpenMP, but Apple's compiler has no -fopenmp: the CPU kernels run on one thread")
        return []
    return ["-fopenmp"]


# The flags torch compiles its own AVX2 and AVX-512 kernels with (cmake/Codegen.cmake).
X86_BUILDS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def cpu_builds():
    """{build name: its extra compiler flags} of the CPU kernels."""
    if os.environ.get("FUSEDBN_CPU_ARCH"):
        return {"native": [f"-march={os.environ['FUSEDBN_CPU_ARCH']}"]}
    if platform.machine().lower() in ("x86_64", "amd64"):
        return X86_BUILDS
    return {"default": []}


def cpu_extensions():
    return [cpp_extension.CppExtension(f"fusedbn._cpu_{name}", sources("csrc/cpu/*.cpp"),
                                       extra_compile_args={"cxx": ["-O3"] + openmp_flags() + flags},
                                       extra_link_args=openmp_flags())
            for name, flags in cpu_builds().items()]


def build_jobs():
    """Compilers to run at once: MAX_JOBS, as torch's extensions read it, else one per core."""
    jobs = os.environ.get("MAX_JOBS", "")
    if jobs.isdigit() and int(jobs) > 0:
        return int(jobs)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity


def cuda_archs():
    """The architectures nvcc compiles for, from the -gencode flags torch derives from TORCH_CUDA_ARCH_LIST:
    sm_XY (machine code) and compute_XY (PTX), comma-separated, e.g. "sm_80,sm_90,compute_90"."""
    codes = set()
    for flag in cpp_extension._get_cuda_arch_flags():  # -gencode=arch=compute_90,code=sm_90 or code=[sm_90,...]
        for listed in re.findall(r",code=\[?([\w,]+)\]?", flag):
            codes.update(listed.split(","))
    return ",".join(sorted(codes, key=lambda code: (code.startswith("compute_"), code)))


def extension():
    cxx_flags = ["-O3"]
    link_flags = []
    cpp_sources = ["csrc/fusedbn.cpp", "csrc/autograd.cpp", "csrc/cuda_archs.cpp"]
    if not want_cuda():
        return cpp_extension.CppExtension("fusedbn._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                                          extra_link_args=link_flags)
    # +PTX: the sm_90 PTX too, which the driver compiles for newer GPUs (Blackwell) at first use; without
    # it they would find no kernel image.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    archs = cuda_archs()
    print(f"fusedbn: building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} ({archs})")
    return cpp_extension.CUDAExtension(
        "fusedbn._C",
        cpp_sources + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags + [f"-DFUSEDBN_CUDA_ARCHS={archs}"],
                            # nvcc compiles the architectures in parallel, within the build's share of jobs.
                            "nvcc": ["-O3", f"--threads={BuildConcurrently.jobs_per_extension}"]},
        extra_link_args=link_flags,
    )


def simt_extension():
    # Rounded as written, with an fma exactly where the source writes one (host_device.h's mul_add and
    # fma_exact: libm's fma, correctly rounded on any x86-64, where nvcc's fma is): g++'s own contraction
    # (its default wherever the target has FMA, e.g. aarch64) would fuse other products than nvcc does, so
    # the emulator does not try to imitate it. No -mfma: the library runs on any x86-64.
    return cpp_extension.CppExtension(
        "fusedbn._simt",
        ["csrc/simt/ops.cpp"],
        # -fno-gnu-unique: the emulator's state (its settings, the running launch) is this library's own, not
        # shared with another built from simt.h in the same process (the self-test's).
        extra_compile_args={"cxx": ["-O2", "-Wno-unknown-pragmas", "-ffp-contract=off", "-DFUSEDBN_EXACT_FMA",
                                    "-fno-gnu-unique"]},
    )


class BuildConcurrently(cpp_extension.BuildExtension):
    """torch's BuildExtension with the extensions built concurrently (setuptools' parallel build_ext), each in
    a build directory of its own (sharing one, they overwrite each other's build.ninja and, where two builds
    compile the same source, its object file). At most build_jobs() compilers run: extensions_at_once
    builds at once, each ninja running jobs_per_extension of them."""

    extensions_at_once = 1
    jobs_per_extension = 1

    @classmethod
    def plan(cls, count):
        jobs = build_jobs()
        cls.extensions_at_once = max(1, min(jobs, count))
        cls.jobs_per_extension = max(1, jobs // cls.extensions_at_once)
        os.environ["MAX_JOBS"] = str(cls.jobs_per_extension)  # read by torch's ninja runs
        print(f"fusedbn: {jobs} compilers at once: {cls.extensions_at_once} extensions, "
              f"{cls.jobs_per_extension} each (MAX_JOBS sets the total)")

    def finalize_options(self):
        super().finalize_options()
        self.parallel = self.extensions_at_once

    def build_extension(self, ext):
        own = copy.copy(self)
        own.build_temp = os.path.join(self.build_temp, ext.name)
        start = time.perf_counter()
        super(BuildConcurrently, own).build_extension(ext)
        print(f"fusedbn: built {ext.name} in {time.perf_counter() - start:.0f} s", flush=True)


def extensions():
    others = cpu_extensions() + ([simt_extension()] if os.environ.get("FUSEDBN_SIMT") == "1" else [])
    BuildConcurrently.plan(1 + len(others))  # before extension() gives nvcc its share of the jobs
    return [extension()] + others


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildConcurrently.with_options(use_ninja=True)},
)
