"""Times a build command and how many compilers it ran at once.

    python benchmarks/build_time.py -- make build
    python benchmarks/build_time.py --json out.json -- pip install --no-build-isolation .

Samples the processes below the command every --interval seconds and counts the compilers among them (cc1plus,
cicc and ptxas, the processes g++ and nvcc do their work in); prints the wall time, the most compilers seen
at once, their mean over the samples, and the command's own "fusedbn: ..." lines (its whole output goes to
--log). Linux only (/proc).
"""
import argparse
import json
import os
import subprocess
import sys
import time

COMPILERS = ("cc1plus", "cicc", "ptxas")


def processes() -> tuple:
    """{pid: parent pid} and {pid: name} of every process."""
    parents, names = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
        names[int(entry)] = name
    return parents, names


def compilers_below(root: int) -> int:
    parents, names = processes()
    count = 0
    for pid, name in names.items():
        if name not in COMPILERS:
            continue
        ancestor = parents.get(pid)
        while ancestor and ancestor != root:
            ancestor = parents.get(ancestor)
        count += ancestor == root
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--log", default="build_time.log", help="the command's output (default: %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the build command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    start = time.perf_counter()
    samples = []
    with open(args.log, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            samples.append(compilers_below(process.pid))
            time.sleep(args.interval)
    wall = time.perf_counter() - start
    with open(args.log) as log:
        output = log.read()
    print("\n".join(line for line in output.splitlines() if line.startswith("fusedbn: ")))
    built = [line for line in output.splitlines() if line.startswith("fusedbn: built ")]
    result = {"command": " ".join(command), "returncode": process.returncode, "wall_s": round(wall, 1),
              "most_compilers_at_once": max(samples, default=0),
              "mean_compilers": round(sum(samples) / max(1, len(samples)), 2), "built": built}
    print(f"build_time: {result['command']}: {wall:.0f} s wall, exit {process.returncode}; compilers at once: "
          f"at most {result['most_compilers_at_once']}, {result['mean_compilers']} on average")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
