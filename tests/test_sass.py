"""The streaming kernels' hot loops in the sm_90 machine code, against what an H200 needs to stream at its
bandwidth limit (issue 28; the analysis: shared/reviews/cuda-v2-sass-review.md).

Read without a GPU by benchmarks/sass.py from `cuobjdump -sass` of the library named by
$FUSEDBN_SASS_LIBRARY (default: the fusedbn._C this Python imports), for every vectorized instantiation
(kVec > 1) of the families in FAMILIES. Each trip of a kernel's hot loop must keep two or more 16-byte
loads in flight before it waits for one, load 16-byte vectors only, stay within an issue budget per
16 bytes, and branch through no jump table (BRX); the elementwise loops also call no IEEE division or
square-root slow path. A failure message gives the numbers and the SASS addresses to look at
(`.venv/bin/python benchmarks/sass.py --kernel REGEX` prints the table).
"""
import dataclasses
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sass  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Family:
    kind: str  # "reduce", "elementwise" or "forward": the budget and checks that apply
    kvec_index: int = -1  # which of the kernel's integer template arguments is kVec


# The streaming kernel families (the unqualified function names). A new or renamed kernel goes here.
FAMILIES = {
    "channels_first_reduce_kernel": Family("reduce"),
    "channels_last_reduce_kernel": Family("reduce"),
    "channels_first_elementwise_kernel": Family("elementwise"),
    "channels_last_elementwise_kernel": Family("elementwise"),
    # <scalar, acc, param, kVec, kRows>: kRows rows unrolled, no loop: its trip is the kernel from the
    # first row load to the end (statistics, then normalize; sass.hot_loop).
    "channels_first_forward_kernel": Family("forward", kvec_index=0),
}

# Issue budget, SASS instructions per 16 bytes a trip loads or stores. At ~4.3 TB/s over 132 SMs an
# H200 SM moves 2.04 G 16-byte vectors a second; it issues 4 warp-instructions a cycle at 1.98 GHz, each
# for 32 threads: 4 * 1.98e9 * 32 / 2.04e9 ~ 124 instructions per thread and 16-byte vector at full
# issue (the review's P2). A loop waiting on memory does not issue every cycle: 100 leaves ~20 %. Every
# byte read or written costs the same DRAM time, so the passes that write get 100 per 16 bytes moved
# (~200 per vector read and written).
BUDGET_PER_16B = {"reduce": 100, "elementwise": 100, "forward": 100}

# Loads in flight: at ~1024 resident threads an SM needs 2+ 16-byte vectors per thread in flight to
# cover the loaded DRAM latency (Little's law: ~20-26 KB per SM; the review's P1).
MIN_LOADS_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class Exemption:
    """Checks relaxed for the instantiations whose demangled name contains all of `names`, and why."""
    names: tuple[str, ...]
    loads_in_flight: int = MIN_LOADS_IN_FLIGHT
    narrow_loads: bool = False
    indirect_branch: bool = False
    slow_path: bool = False
    why: str = ""

    def applies(self, kernel: sass.Kernel) -> bool:
        return all(n in kernel.name for n in self.names)


PRELU = "FixedActivation<(fusedbn::Activation)9>"  # its kernels' template argument, as demangled
EXEMPTIONS = [
    # The activations other than identity and ReLU (the common ones, template arguments) are chosen from
    # the run-time value once per 16-byte vector: a jump table, their divisions' slow paths (SiLU's,
    # Hardswish's), and the registers of their code leave room for one vector in flight, not two.
    Exemption(("AnyActivation",), loads_in_flight=1, indirect_branch=True, slow_path=True,
              why="any activation: chosen once per vector, one vector in flight"),
    # The one-launch forward's trip is its loop over channels, which loads each channel's shift (its first
    # value, one scalar) beside the 16-byte rows (checked for loads in flight above).
    Exemption(("channels_first_forward_kernel",), narrow_loads=True, why="the channel's shift, once per channel"),
    # The gradient sums in a 2-byte type where any activation's code may run: its registers leave room for
    # 4 lanes (8-byte vectors), not 8.
    *(Exemption(("GradReducer", "AnyActivation", dtype), loads_in_flight=0, narrow_loads=True,
                why="gradient sums in a 2-byte type under any activation: 8-byte vectors")
      for dtype in ("c10::BFloat16", "c10::Half")),
    # PReLU's backward carries its slope per channel beside the coefficients, and its gradient sums a third
    # sum a lane (its weight's gradient): one vector in flight, and in a 2-byte type 4 lanes, as above.
    Exemption(("GradReducer", PRELU), loads_in_flight=1, why="PReLU's gradient sums: one vector in flight"),
    Exemption(("BackwardElemtOp", PRELU), loads_in_flight=1, why="PReLU's dx pass: one vector in flight"),
    *(Exemption(("GradReducer", PRELU, dtype), loads_in_flight=0, narrow_loads=True,
                why="PReLU's gradient sums in a 2-byte type: 8-byte vectors")
      for dtype in ("c10::BFloat16", "c10::Half")),
]


def exemption(kernel: sass.Kernel) -> Exemption:
    """What applies to `kernel`: every matching exemption at once (none: every check at full strength)."""
    found = [e for e in EXEMPTIONS if e.applies(kernel)]
    return Exemption((), loads_in_flight=min([MIN_LOADS_IN_FLIGHT] + [e.loads_in_flight for e in found]),
                     narrow_loads=any(e.narrow_loads for e in found),
                     indirect_branch=any(e.indirect_branch for e in found), slow_path=any(e.slow_path for e in found),
                     why="; ".join(e.why for e in found))


def _streaming_kernels() -> tuple[list, str]:
    """The vectorized instantiations (kVec > 1) of FAMILIES in the library, or [] and why there are none.
    kVec > 1 rather than kVec * element size == 16: a 2-byte type's 4-lane instantiation (8-byte vectors,
    v2's bf16 backward) is checked too, and fails the 16-byte width check."""
    try:
        library = sass.default_library()
        found = sass.kernels(library)
    except (FileNotFoundError, ImportError) as e:  # no triton (cuobjdump), no c++filt, no fusedbn._C
        return [], str(e)
    if not found:
        return [], f"{library} has no sm_90 code (FUSEDBN_CUDA=0, or built without nvcc)"
    vectorized = [k for k in found if k.family in FAMILIES and k.int_args[FAMILIES[k.family].kvec_index] > 1]
    return sorted(vectorized, key=lambda k: k.short_name), ""


KERNELS, NO_KERNELS = _streaming_kernels()


def params(checked=lambda kernel: True):
    """The kernels a check applies to (EXEMPTIONS lists those it does not, and why)."""
    return ([pytest.param(k, id=k.short_name) for k in KERNELS if checked(k)]
            or [pytest.param(None, marks=pytest.mark.skip(NO_KERNELS or "no kernel"))])


def _hot_loop(kernel: sass.Kernel) -> sass.Loop:
    loop = sass.hot_loop(kernel)
    assert loop is not None, f"{kernel.short_name}: no loop or straight-line region issues a global load"
    return loop


def _where(loop: sass.Loop) -> str:
    kind = "loop" if loop.back_edge else "straight-line region"
    return f"{kind} {loop.start:#06x}-{loop.end:#06x}, {loop.instructions} instructions a trip"


def _listed(instructions) -> str:
    return ", ".join(f"{i.address:#06x} {i.predicate + ' ' if i.predicate else ''}{i.opcode}" for i in instructions)


@pytest.mark.skipif(not KERNELS, reason=NO_KERNELS or "no kernels")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_streaming_family_is_compiled(family):
    """A family renamed or gone would leave its kernels unchecked: FAMILIES must follow the source."""
    assert any(k.family == family for k in KERNELS), \
        f"no vectorized {family} in the sm_90 code: renamed? (update FAMILIES in {Path(__file__).name})"


@pytest.mark.parametrize("kernel", params())
def test_loads_in_flight_before_first_use(kernel):
    loop = _hot_loop(kernel)
    allowed = exemption(kernel).loads_in_flight
    reason = exemption(kernel).why if allowed < MIN_LOADS_IN_FLIGHT else ""
    use = loop.first_use()
    waits = f"the load at {use[0].address:#06x} ({use[0].opcode}) is first read at {use[1].address:#06x} " \
            f"({use[1].opcode} {', '.join(use[1].operands)})" if use else "no loaded value is read"
    vectors = _listed(i for i in loop.path if i.load_width == 16)
    assert loop.loads_before_use >= allowed, (
        f"{kernel.short_name}: {loop.loads_before_use} unguarded 16-byte loads issued before the first use of a "
        f"loaded value, need >= {allowed}{' (' + reason + ')' if reason else ''}; {waits}; the trip's 16-byte "
        f"loads: {vectors or 'none'} ({_where(loop)})")


@pytest.mark.parametrize("kernel", params(lambda k: not exemption(k).narrow_loads))
def test_loads_are_16_byte_vectors(kernel):
    """Every global load a trip issues, in every dtype (2-byte types too: 8 lanes)."""
    loop = _hot_loop(kernel)
    narrow = [i for i in loop.path if i.load_width and i.load_width != 16]
    kvec = kernel.int_args[FAMILIES[kernel.family].kvec_index]
    assert not narrow, (f"{kernel.short_name} ({kernel.scalar_type}, kVec {kvec}): loads narrower than 16 bytes in "
                        f"the trip: {_listed(narrow)} ({_where(loop)})")


@pytest.mark.parametrize("kernel", params())
def test_instructions_per_16_bytes_within_budget(kernel):
    loop = _hot_loop(kernel)
    budget = BUDGET_PER_16B[FAMILIES[kernel.family].kind]
    assert loop.instructions_per_16B <= budget, (
        f"{kernel.short_name}: {loop.instructions} instructions for {loop.bytes_per_trip} bytes loaded or stored "
        f"a trip = {loop.instructions_per_16B:.0f} per 16 B, budget {budget} ({_where(loop)}; loads "
        f"{dict(loop.loads)}, stores {dict(loop.stores)}, by bytes per access)")


@pytest.mark.parametrize("kernel", params(lambda k: not exemption(k).indirect_branch))
def test_no_indirect_branch_in_hot_loop(kernel):
    """A BRX is a switch through a jump table (the activation or gradient rule chosen per element)."""
    loop = _hot_loop(kernel)
    brx = [i for i in loop.body if i.base == "BRX"]
    assert not brx, (f"{kernel.short_name}: {len(brx)} BRX in the hot loop ({kernel.count('BRX')} in the kernel): "
                     f"{_listed(brx[:6])}{' ...' if len(brx) > 6 else ''} ({_where(loop)})")


@pytest.mark.parametrize("kernel", params(lambda k: FAMILIES[k.family].kind == "elementwise" and not exemption(k).slow_path))
def test_no_division_slow_path_in_elementwise_loop(kernel):
    """An IEEE division or square root compiles to a fast path (MUFU.RCP or MUFU.RSQ and Newton steps) and a
    CALL to its slow path: either on the trip's path is a division or square root per vector or element
    (coefficients recomputed per vector, an activation's). Off the path, behind a branch, is allowed: the
    channels-first passes recompute a channel's coefficients (eval: a square root and a division) when a
    thread's channel changes."""
    loop = _hot_loop(kernel)
    found = [i for i in loop.path if i.base == "CALL" or i.opcode.startswith(("MUFU.RCP", "MUFU.RSQ"))]
    assert not found, (f"{kernel.short_name}: {len(found)} divisions or square roots (their MUFU fast paths, CALLs "
                       f"to their slow paths) on the trip's path: {_listed(found[:6])}"
                       f"{' ...' if len(found) > 6 else ''} ({_where(loop)})")
