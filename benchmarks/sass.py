"""What decides the CUDA kernels' speed, read from the sm_90 machine code (SASS) of a built fusedbn._C.

    .venv/bin/python benchmarks/sass.py                                  # every sm_90 kernel of fusedbn._C
    .venv/bin/python benchmarks/sass.py --library /tmp/v2/_C...so --kernel 'channels_last_reduce.*Welford'

`cuobjdump -sass --dump-resource-usage` (torch's Linux wheel brings it in triton's package) gives each
kernel's registers, shared/local/stack bytes and instructions. From them:

* `blocks_per_sm`: how many blocks of a kernel an H200 (Hopper) SM holds, so the threads it keeps resident;
* `hot_loop`: the kernel's streaming loop, found from its back-edges, and per trip of it: the instructions,
  the global loads and stores by width, how many 16-byte loads are in flight before the thread first waits
  for one (`loads_before_use`), the instructions per 16 bytes moved, and what should not be there (indirect
  branches `BRX`, the IEEE division/square-root slow paths that are `CALL`s, `MUFU` ops).

The numbers are static (read, not measured): tests/test_sass.py holds the kernels to budgets derived from
the H200's issue rate and bandwidth (cuda-v2-sass-review.md, issue 28).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

# Hopper (sm_90) per SM: 64K 32-bit registers, allocated per warp in units of 256; 64 warps; 32 blocks;
# 228 KB of shared memory, 1 KB of it reserved per block.
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024

# Bytes per access of the global load/store modifiers; no width modifier: 4 bytes.
ACCESS_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
# The opcodes that read or write global memory (LD/ST are generic: global in these kernels).
GLOBAL_LOADS = ("LDG", "LD")
GLOBAL_STORES = ("STG", "ST")
# Opcodes whose operands are all read: no destination register comes first.
NO_DESTINATION = ("STG", "ST", "STS", "STL", "RED", "BRA", "BRX", "CALL", "RET", "EXIT", "BAR", "BSSY", "BSYNC",
                  "MEMBAR", "CCTL", "WARPSYNC", "NOP")

# "        /*0070*/              @!P0 BRA 0xb0 ;   /* 0x...encoding */": address, guard, opcode, operands.
_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(@!?U?P(?:\d+|T)\s+)?([A-Z][A-Z0-9_.]*) ?(.*?)\s*;", re.M)
_REGISTER = re.compile(r"(?<![A-Za-z0-9_])R(\d+)(\.64)?\b")
_FUNCTION_RESOURCES = re.compile(r"^\s*Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", re.M)


class Instruction(NamedTuple):  # a tuple: the library's ~400k are made quickly
    address: int
    predicate: str  # "" or the guard, e.g. "@!P0"
    opcode: str  # with its modifiers, e.g. "LDG.E.128"
    operands: tuple[str, ...]

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def _width(self) -> int:
        return next((ACCESS_WIDTHS[m] for m in self.opcode.split(".")[1:] if m in ACCESS_WIDTHS), 4)

    @property
    def load_width(self) -> int:
        """Bytes a global load reads, 0 for anything else."""
        return self._width() if self.base in GLOBAL_LOADS else 0

    @property
    def store_width(self) -> int:
        """Bytes a global store writes, 0 for anything else."""
        return self._width() if self.base in GLOBAL_STORES else 0

    @property
    def target(self) -> int | None:
        """The address a BRA jumps to (its last operand)."""
        if self.base != "BRA":
            return None
        return int(self.operands[-1], 16)

    @property
    def conditional(self) -> bool:
        """A guard predicate, or a uniform predicate operand (`BRA.U !UP0, 0x...`)."""
        return bool(self.predicate) or len(self.operands) > 1

    def registers_read(self) -> set[int]:
        """The general registers the instruction reads: `[R2.64]` reads R2 and R3; a store reads its data
        register and as many after it as its width takes. Wide reads that SASS does not mark (a DADD's
        second register) start at an even register, which is the one named, so a load's range that
        begins there is still matched."""
        sources = self.operands if self.base in NO_DESTINATION else self.operands[1:]
        read = set()
        for operand in sources:
            for m in _REGISTER.finditer(operand):
                first = int(m.group(1))
                read.update(range(first, first + (2 if m.group(2) else 1)))
        if self.base in ("STG", "ST", "STS", "STL") and self._width() > 4:
            data = _REGISTER.search(self.operands[-1])
            if data:
                read.update(range(int(data.group(1)), int(data.group(1)) + self._width() // 4))
        return read

    def registers_loaded(self) -> range:
        """The registers a global load writes: `LDG.E.128 R4` writes R4..R7."""
        m = _REGISTER.match(self.operands[0]) if self.operands else None
        if not m:  # RZ: a load for its side effect only
            return range(0)
        return range(int(m.group(1)), int(m.group(1)) + max(1, self.load_width // 4))


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity: hot_loop caches per kernel
class Kernel:
    mangled: str
    name: str  # demangled, with the parameter list
    registers: int
    shared: int  # static shared memory (sm_90's figure includes a reserved 1 KB where the kernel uses any)
    local: int
    stack: int
    instructions: tuple[Instruction, ...]

    @property
    def family(self) -> str:
        """The function's unqualified name, e.g. "channels_first_reduce_kernel"."""
        return self.name.split("<")[0].split("(")[0].split()[-1].split("::")[-1]

    @property
    def template_args(self) -> list[str]:
        return template_args(self.name)

    @property
    def int_args(self) -> list[int]:
        """The integer template arguments, in order (kVec, kRows, ...)."""
        return [int(a) for a in self.template_args if re.fullmatch(r"-?\d+", a)]

    @property
    def scalar_type(self) -> str:
        """The element type: the first template argument, or its own first one, down to a plain type
        (`WelfordReducer<c10::BFloat16, float>` -> `c10::BFloat16`)."""
        arg = self.template_args[0]
        while template_args(arg):
            arg = template_args(arg)[0]
        return arg

    @property
    def short_name(self) -> str:
        """Family and template arguments, shortened: `channels_last_reduce<Welford<bf16,f32>,Stats<f32,f32>,8>`."""
        text = _without_parameters(self.name).removeprefix("void ")
        text = re.sub(r"\b(fusedbn::cuda::|fusedbn::|c10::)", "", text).replace(", ", ",").replace(" >", ">")
        text = text.replace("_kernel<", "<")
        text = re.sub(r"(Reducer|Finisher|ElemtOp|Op)<", "<", text)
        for long, short in (("BFloat16", "bf16"), ("Half", "f16"), ("float", "f32"), ("double", "f64")):
            text = re.sub(rf"\b{long}\b", short, text)
        return text

    def count(self, opcode: str) -> int:
        """How many instructions of the kernel have this base opcode (e.g. "BRX")."""
        return sum(i.base == opcode for i in self.instructions)


def _without_parameters(name: str) -> str:
    """A demangled name without its parameter list: up to the first "(" outside template arguments (a
    template argument can hold one: `FixedActivation<(fusedbn::Activation)1>`)."""
    depth = 0
    for n, ch in enumerate(name):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            return name[:n]
    return name


def template_args(name: str) -> list[str]:
    """The top-level template arguments of `name<...>` (before any parameter list), [] for a plain name."""
    head = _without_parameters(name)
    if "<" not in head:
        return []
    args, depth, current = [], 0, ""
    for ch in head[head.index("<") + 1:]:
        if ch == "<":
            depth += 1
        elif ch == ">":
            if depth == 0:
                break
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
            continue
        current += ch
    return args + [current.strip()]


@dataclasses.dataclass(frozen=True)
class Loop:
    """One trip of a kernel's streaming loop, along one path through its body (`hot_loop`).

    A global access under a guard predicate (`@P0 LDG.E.128`: a residual that may be null, an x that
    eval's backward does not read, an output that may not be wanted) counts as made in the trip's
    accesses and bytes (a trip with every optional stream present), but not in `loads_before_use`, which
    says what every trip keeps in flight."""

    start: int  # the loop head (the back-edge's target)
    end: int  # the back-edge's address; for a straight-line region, its last instruction
    back_edge: bool  # False: a straight-line region counted as one trip (see hot_loop)
    body: tuple[Instruction, ...]  # every instruction in [start, end]
    path: tuple[Instruction, ...]  # the instructions one trip executes (see _heaviest_path)

    @property
    def instructions(self) -> int:
        """Instructions of one trip (the path), NOPs excluded."""
        return sum(i.base != "NOP" for i in self.path)

    @property
    def body_instructions(self) -> int:
        """Static instructions of the whole body, every path, NOPs excluded (an over-estimate with branches)."""
        return sum(i.base != "NOP" for i in self.body)

    @property
    def loads(self) -> Counter:
        """Global loads of one trip, guarded ones included: {bytes per load: count}."""
        return Counter(i.load_width for i in self.path if i.load_width)

    @property
    def stores(self) -> Counter:
        """Global stores of one trip, guarded ones included: {bytes per store: count}."""
        return Counter(i.store_width for i in self.path if i.store_width)

    @property
    def guarded(self) -> Counter:
        """The trip's guarded global loads and stores: {bytes per access: count}."""
        return Counter(i.load_width + i.store_width for i in self.path
                       if i.predicate and (i.load_width or i.store_width))

    @property
    def bytes_per_trip(self) -> int:
        """Bytes the trip's global loads and stores move."""
        return sum(i.load_width + i.store_width for i in self.path)

    @property
    def instructions_per_16B(self) -> float:
        """Instructions per 16 bytes loaded or stored by one trip."""
        return self.instructions / (self.bytes_per_trip / 16) if self.bytes_per_trip else float("inf")

    def first_use(self) -> tuple[Instruction, Instruction] | None:
        """(load, use): the first instruction of the trip that reads a register a global load of the same
        trip wrote, and that load. A register read before its load in the trip is the previous trip's
        value: no use (software pipelining)."""
        loaded = {}  # register -> the load that last wrote it
        for i in self.path:
            if used := i.registers_read() & loaded.keys():
                return loaded[min(used)], i
            if i.load_width:
                loaded.update(dict.fromkeys(i.registers_loaded(), i))
        return None

    @property
    def loads_before_use(self) -> int:
        """Unguarded 16-byte loads of one trip issued before the first use of any loaded value: the vectors
        a thread has in flight when it first waits for memory."""
        use = self.first_use()
        return sum(i.load_width == 16 and not i.predicate for i in self.path
                   if use is None or i.address < use[1].address)

    def body_count(self, opcode: str) -> int:
        """Instructions with this base opcode (BRX, CALL, MUFU) anywhere in the body, every path."""
        return sum(i.base == opcode for i in self.body)


def cuobjdump_path() -> Path:
    """The cuobjdump that triton's package ships (torch's Linux wheel depends on triton)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("triton (which ships cuobjdump) is not installed")
    tool = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        raise FileNotFoundError(f"no cuobjdump at {tool}")
    return tool


def default_library() -> Path:
    """$FUSEDBN_SASS_LIBRARY, else the fusedbn._C this Python imports."""
    if os.environ.get("FUSEDBN_SASS_LIBRARY"):
        return Path(os.environ["FUSEDBN_SASS_LIBRARY"])
    import fusedbn._C
    return Path(fusedbn._C.__file__)


def kernels(library: Path, arch: str = "sm_90") -> list[Kernel]:
    """Every `arch` function of the library with its resources and instructions ([] without `arch` code)."""
    return list(_kernels(Path(library).resolve(), arch))


@functools.cache
def _kernels(library: Path, arch: str) -> tuple[Kernel, ...]:
    run = subprocess.run([cuobjdump_path(), "-sass", "-res-usage", "-arch", arch, library],
                         capture_output=True, text=True)
    if "does not contain device code" in run.stdout + run.stderr:
        return ()
    if run.returncode:
        raise RuntimeError(f"cuobjdump failed on {library}: {run.stderr.strip() or run.stdout.strip()}")
    # Per ELF: its resource usage ("Function NAME:" then "REG:.."), then its code ("Function : NAME", lines).
    found = []  # (mangled, (registers, stack, shared, local), instructions)
    for elf in run.stdout.split("Fatbin elf code:")[1:]:
        if f"arch = {arch}\n" not in elf:
            continue
        resources = {name: tuple(map(int, numbers)) for name, *numbers in _FUNCTION_RESOURCES.findall(elf)}
        for section in elf.split("Function : ")[1:]:
            mangled = section[:section.index("\n")].strip()
            code = tuple(Instruction(int(address, 16), guard.strip(), opcode,
                                     tuple(operands.split(", ")) if operands else ())
                         for address, guard, opcode, operands in _INSTRUCTION.findall(section))
            found.append((mangled, resources[mangled], code))
    names = demangle([mangled for mangled, _, _ in found])
    return tuple(Kernel(mangled, names[mangled], registers, shared, local, stack, code)
                 for (mangled, (registers, stack, shared, local), code) in found)


def demangle(names: list[str]) -> dict[str, str]:
    """{mangled: demangled} through one c++filt call."""
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def blocks_per_sm(kernel: Kernel, block_threads: int, dynamic_shared: int = 0) -> int:
    """Blocks of `kernel` an sm_90 SM holds at once: the least of what its registers, shared memory, warp
    slots and block slots allow."""
    warps = -(-block_threads // 32)
    per_warp = -(-kernel.registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTERS_PER_SM // per_warp) // warps
    by_shared = SHARED_PER_SM // (kernel.shared + dynamic_shared + SHARED_RESERVED_PER_BLOCK)
    return min(by_registers, by_shared, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps)


@functools.cache
def hot_loop(kernel: Kernel) -> Loop | None:
    """The kernel's streaming loop: of the loops (a BRA back to a lower address closes one), the one whose
    trip (`_heaviest_path`) loads the widest global accesses; of those an innermost one (holding no other
    loop), the most bytes of them; among equals the shortest. A loop with several back-edges to one head is one loop, up to the last. (In a
    scalar, kVec = 1, instantiation that can be the merge of 4- or 8-byte partials rather than the loop
    over 2-byte elements.)

    A kernel whose streaming part is unrolled into straight-line code (no loop issues a global load: the
    one-launch forward reads its kRows rows so) gets a region instead, counted as one trip: from its first
    load of the widest width to its last EXIT (the subroutines, slow paths, follow it). None when the
    kernel loads nothing."""
    code = kernel.instructions
    ends = {}  # head -> last back-edge
    for i in code:
        if i.target is not None and i.target <= i.address:
            ends[i.target] = max(ends.get(i.target, 0), i.address)
    best, best_key = None, None
    for start, end in ends.items():
        loop = _trip(code, start, end, back_edge=True)
        widest = max(loop.loads, default=0)
        # An outer loop (over channels, say) holds the streaming loop: its trip would count that loop's
        # body once, with the outer loop's own work around it.
        innermost = not any(start <= s and e <= end and (s, e) != (start, end) for s, e in ends.items())
        key = (widest, innermost, widest * loop.loads[widest], start - end)
        if widest and (best_key is None or key > best_key):
            best, best_key = loop, key
    if best is not None:
        return best
    widest = max((i.load_width for i in code), default=0)
    if not widest:
        return None
    start = next(i.address for i in code if i.load_width == widest)
    end = max((i.address for i in code if i.base == "EXIT"), default=code[-1].address)
    return _trip(code, start, end, back_edge=False)


def _trip(code: tuple[Instruction, ...], start: int, end: int, back_edge: bool) -> Loop:
    body = tuple(i for i in code if start <= i.address <= end)
    return Loop(start, end, back_edge, body, _heaviest_path(body, back_edge))


def _heaviest_path(body: tuple[Instruction, ...], back_edge: bool) -> tuple[Instruction, ...]:
    """The path one trip takes through a body with branches: from the head to a back-edge (for a region:
    to an EXIT or its last instruction), the path that moves the most bytes in global loads and stores of
    the body's widest load width, and of those the one with the fewest instructions. So for a loop with a
    full-vector path and masked or per-element fallbacks it is the full-vector path; of optional work
    behind a branch it takes the accesses (a residual, a second output) and skips the rest (an
    activation's cases: the identity).

    Followed: fall-through, forward branches within the body; not followed: branches out of the body
    (exits) and back to inner loops' heads, so an inner loop counts one trip. A BRX's targets are in a
    jump table the listing does not show: the path goes on with the code after it (the first case). A CALL
    (a slow path in a subroutine) is taken as returning. Every instruction on the path counts, predicated
    ones included."""
    start = body[0].address
    index = {i.address: n for n, i in enumerate(body)}
    wide = max((i.load_width for i in body), default=0)

    def weight(i: Instruction) -> int:
        return (i.load_width == wide) * wide + (i.store_width == wide) * wide

    # Branches only go forward within the body (back-edges end the trip), so address order is a
    # topological order: best[n] = (bytes, -instructions, predecessor) of the best path reaching body[n].
    best: list[tuple[int, int, int] | None] = [None] * len(body)
    best[0] = (0, 0, -1)
    finish = None  # (bytes, -instructions, index of the last instruction)
    for n, i in enumerate(body):
        if best[n] is None:
            continue
        here = (best[n][0] + weight(i), best[n][1] - (i.base != "NOP"), n)
        successors = []
        if i.target is not None and i.target > i.address and i.target in index:
            successors.append(index[i.target])
        elif i.target == start and back_edge:  # a whole trip
            finish = max(finish or here, here)
        if not ((i.target is not None or i.base in ("EXIT", "RET")) and not i.conditional):  # falls through
            if n + 1 < len(body):
                successors.append(n + 1)
            elif not back_edge:  # a region's last instruction
                finish = max(finish or here, here)
        elif i.base == "EXIT" and not back_edge:
            finish = max(finish or here, here)
        for s in successors:
            if best[s] is None or here > best[s]:
                best[s] = here
    if finish is None:
        return ()
    path, n = [], finish[2]
    while n >= 0:
        path.append(body[n])
        n = best[n][2]
    return tuple(reversed(path))


def _widths(counter: Counter) -> str:
    return " ".join(f"{n}x{w}B" for w, n in sorted(counter.items(), reverse=True)) or "-"


def table(library: Path, pattern: str = "") -> str:
    """The CLI's table: one row per kernel whose demangled or short name matches `pattern`."""
    rows = [("kernel", "regs", "thr@256", "thr@512", "instr", "body", "loads", "stores", "guarded", "before_use",
             "instr/16B", "BRX", "CALL", "MUFU")]
    for k in sorted(kernels(library), key=lambda k: k.short_name):
        if not (re.search(pattern, k.name) or re.search(pattern, k.short_name)):
            continue
        loop = hot_loop(k)
        row = (k.short_name, str(k.registers), str(256 * blocks_per_sm(k, 256)), str(512 * blocks_per_sm(k, 512)))
        if loop is None:
            rows.append(row + ("-",) * 10)
            continue
        rows.append(row + (f"{loop.instructions}{'' if loop.back_edge else '*'}", str(loop.body_instructions),
                           _widths(loop.loads),
                           _widths(loop.stores), _widths(loop.guarded), str(loop.loads_before_use),
                           f"{loop.instructions_per_16B:.0f}", f"{loop.body_count('BRX')}/{k.count('BRX')}",
                           str(loop.body_count("CALL")), str(loop.body_count("MUFU"))))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join(lines + [
        "",
        "thr@N: threads resident per SM at N threads a block. Of one trip of the hot loop (* a straight-line",
        "region, no loop): instr, its instructions (body: the static count of every path), its global loads and",
        "stores (guarded: those of them under a predicate), before_use: unguarded 16-B loads issued before the",
        "first use of a loaded value, instr/16B: per 16 B loaded or stored. BRX: in the loop / in the kernel;",
        "CALL (division/square-root slow paths) and MUFU: in the loop."])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, help="a built _C*.so (default: $FUSEDBN_SASS_LIBRARY, else fusedbn._C)")
    parser.add_argument("--kernel", default="", help="only kernels whose name (demangled or short) matches this regex")
    args = parser.parse_args(argv)
    library = args.library or default_library()
    if not kernels(library):
        sys.exit(f"{library}: no sm_90 code")
    print(table(library, args.kernel))


if __name__ == "__main__":
    main()
