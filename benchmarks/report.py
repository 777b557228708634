"""Output of the benchmarks: the header and table (rich on a terminal, aligned text when piped), JSON, CSV,
the speedup figure, and the README's markdown table rendered from results files.

    python benchmarks/report.py FILE.json...          # markdown table of fusedbn against torch's BatchNorm
    python benchmarks/report.py --readme benchmarks/README.md    # re-render the table between README's markers from
                                                      # the files its start marker names
"""
import argparse
import csv
import json
import re
import sys
from pathlib import Path

# Mode names of results files written before the current command line (benchmarks/results/h100/).
LEGACY_MODES = {"train fwd": "train-fwd", "train fwd+bwd": "train-fwd-bwd", "eval fwd": "eval"}
README_START = re.compile(r"<!-- bench-table: (?P<files>[^>]*?) -->\n")
README_END = "<!-- /bench-table -->"
VERDICT_LEGEND = ("faster where our slowest round beats the anchor's best, slower where our best round loses to "
                  "the anchor's slowest, else tie: the rounds run interleaved, so the machine's load moves both "
                  "ranges alike, and two that overlap are within this run's noise (one round: no range, no tie)")


def unique(values):
    return list(dict.fromkeys(values))


def verdict(ours, anchor):
    """'faster', 'tie' or 'slower': ours against an anchor, each a (best, slowest) range of its rounds'
    median times (VERDICT_LEGEND)."""
    if ours[1] < anchor[0]:
        return "faster"
    if ours[0] > anchor[1]:
        return "slower"
    return "tie"


def verdict_of(row, mine, anchor):
    """verdict() of `mine` against `anchor` in a row, whose `{name}_s` is the best round and `{name}_spread`
    the slowest over it less 1; None in rows of results files that recorded no spreads."""
    if f"{mine}_spread" not in row or f"{anchor}_spread" not in row:
        return None
    mine_range, anchor_range = ((row[f"{name}_s"], row[f"{name}_s"] * (1 + row[f"{name}_spread"]))
                                for name in (mine, anchor))
    return verdict(mine_range, anchor_range)


def shape_str(shape):
    return "x".join(map(str, shape))


def header_lines(meta):
    anchors, ours = meta["anchors"], meta["ours"]
    passes = "; ".join(f"{workload}: " + ", ".join(f"{mode} {n}" for mode, n in per_mode.items())
                       for workload, per_mode in meta["passes"].items())
    return [
        f"fusedbn benchmark on {meta['machine']} ({meta['device']}, {meta['backend']}, threads: {meta['threads']}); "
        f"torch {meta['torch']}, fusedbn {meta['fusedbn']}, Python {meta['python']}",
        f"bytes = passes over the tensor x numel x element size; passes: {passes} (copy {meta['copy_passes']})",
        "GB/s = bytes / median time; % roof = that over the GB/s of a plain copy of the same tensor in this run",
        "contenders: " + ", ".join(f"{name} = {description}" for name, description in meta["contenders"].items())
        + "; " + ", ".join(f"{mine}/{anchor}" for mine in ours for anchor in anchors)
        + " = time over time (< 1: ours faster)",
        "verdict (" + ", ".join(f"{mine} vs {anchor}" for mine in ours for anchor in anchors) + "): each one's "
        f"rounds give a range of times, best to slowest; {VERDICT_LEGEND}",
        "peak MiB (training step): " + ("peak allocated during forward+backward" if meta["device"].startswith("cuda")
                                        else "bytes saved for backward, each storage once"),
        "spread % = the slowest round's median over the best's, largest of the contenders; "
        f"'unsteady': the copy's time moved by more than {meta['unsteady_copy']:.0%} between rounds "
        "(the machine's load changed: rerun before believing the row)",
    ]


def _cell(key, fmt=None, scale=1.0):
    """A column's renderer: the row's value at `key`, formatted by `fmt` (numbers) or as it is (text)."""
    def render(row):
        value = row[key]
        if value is None:
            return "-"
        return value if fmt is None else format(value * scale, fmt)
    return render


def columns(meta):
    """(header, row -> text) for every column of the table, from the contenders in the run."""
    names = meta["anchors"] + meta["ours"]
    cols = [("workload", lambda r: r["workload"]), ("shape", lambda r: shape_str(r["shape"])),
            ("layout", lambda r: r["layout"]),
            ("dtype", lambda r: r["dtype"]), ("mode", lambda r: r["mode"]), ("copy GB/s", _cell("copy_gbps", ".1f"))]
    for name in names:
        cols += [(f"{name} ms", _cell(f"{name}_s", ".3f", 1e3)), (f"{name} GB/s", _cell(f"{name}_gbps", ".1f")),
                 (f"{name} % roof", _cell(f"{name}_roofline", ".0f", 100))]
    cols += [(f"{mine}/{anchor}", _cell(f"{mine}_over_{anchor}", ".2f"))
             for mine in meta["ours"] for anchor in meta["anchors"]]
    cols += [(f"{mine} vs {anchor}", _cell(f"{mine}_vs_{anchor}"))
             for mine in meta["ours"] for anchor in meta["anchors"]]
    cols += [(f"{name} peak MiB", _cell(f"{name}_peak_bytes", ".1f", 2 ** -20)) for name in names]
    cols += [("spread %", lambda r: format(100 * max(r[f"{name}_spread"] for name in names), ".0f")),
             ("", lambda r: "unsteady" if r["unsteady"] else "")]
    return cols


def summary_lines(rows, meta):
    """One line per row: the workload, shape, layout, dtype and mode, each of ours over each anchor with its
    verdict, and our fraction of the roofline, with the row's spread (and its flag)."""
    names = meta["anchors"] + meta["ours"]
    lines = []
    for row in rows:
        ratios = [f"{mine}/{anchor} {row[f'{mine}_over_{anchor}']:.2f} {row[f'{mine}_vs_{anchor}']}"
                  for mine in meta["ours"] for anchor in meta["anchors"]]
        roofs = [f"{mine} {100 * row[f'{mine}_roofline']:.0f}% of roofline" for mine in meta["ours"]]
        spread = max(row[f"{name}_spread"] for name in names)
        lines.append([row["workload"], shape_str(row["shape"]), row["layout"], row["dtype"], row["mode"],
                      *ratios, *roofs, f"spread {100 * spread:.0f}%", "unsteady" if row["unsteady"] else ""])
    return aligned(lines)


def aligned(lines):
    """Lines of cells as text lines, each column right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]


def plain_table(rows, meta):
    cols = columns(meta)
    return aligned([[header for header, _ in cols]] + [[render(row) for _, render in cols] for row in rows])


def print_table(rows, meta):
    """A rich table on a terminal, plain aligned text otherwise (pipes, files, tests)."""
    if not sys.stdout.isatty():
        print("\n".join(plain_table(rows, meta)), flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    cols = columns(meta)
    cells = [[render(row) for _, render in cols] for row in rows]
    table = Table()
    for header, _ in cols:
        table.add_column(header, justify="right")
    for line in cells:
        table.add_row(*line)
    # As wide as the table needs (padding and border add 3 characters per column), not squeezed to a narrow
    # terminal, which would cut the numbers short.
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, (header, _) in enumerate(cols)]
    console = Console()
    Console(width=max(console.width, sum(widths) + 3 * len(cols) + 1)).print(table)


def write_json(path, meta, rows):
    Path(path).write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(dict(row, shape=shape_str(row["shape"])) for row in rows)


def plot(path, rows, meta):
    """Speedup (anchor time over ours, > 1: ours faster) per shape, one panel per layout and mode."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    layouts, modes = unique(r["layout"] for r in rows), unique(r["mode"] for r in rows)
    shapes, dtypes = unique(shape_str(r["shape"]) for r in rows), unique(r["dtype"] for r in rows)
    workloads = unique(r["workload"] for r in rows)
    series = [(workload, mine, anchor, dtype) for workload in workloads for mine in meta["ours"]
              for anchor in meta["anchors"] for dtype in dtypes]
    by_key = {(r["workload"], shape_str(r["shape"]), r["layout"], r["dtype"], r["mode"]): r for r in rows}
    fig, axes = plt.subplots(len(layouts), len(modes), squeeze=False, sharey=True,
                             figsize=(1.2 + 0.5 * len(shapes) * len(modes), 1.2 + 2.8 * len(layouts)))
    width = 0.8 / len(series)
    for axes_row, layout in zip(axes, layouts):
        for ax, mode in zip(axes_row, modes):
            for k, (workload, mine, anchor, dtype) in enumerate(series):
                found = [by_key.get((workload, shape, layout, dtype, mode)) for shape in shapes]
                speedups = [1 / r[f"{mine}_over_{anchor}"] if r else float("nan") for r in found]
                positions = [i - 0.4 + (k + 0.5) * width for i in range(len(shapes))]
                ax.bar(positions, speedups, width, label=f"{workload}: {mine} vs {anchor}, {dtype}")
            ax.axhline(1, color="black", linewidth=0.8)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.set_title(f"{mode}, {layout}", fontsize=9)
            ax.set_xticks(range(len(shapes)), shapes, rotation=60, ha="right", fontsize=7)
        axes_row[0].set_ylabel("speedup (> 1: faster)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"{meta['machine']}, torch {meta['torch']}", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_results(path):
    """(meta, rows) of a results file, with the mode names of older files brought to the current ones."""
    data = json.loads(Path(path).read_text())
    rows = [dict(row, mode=LEGACY_MODES.get(row["mode"], row["mode"]), workload=row.get("workload", "bn"))
            for row in data.pop("rows")]
    return data, rows


def _ratio_cell(row):
    """fusedbn's time over torch's, 'tie' where their ranges of round times overlap, and its roofline."""
    tie = " tie" if verdict_of(row, "fusedbn", "torch") == "tie" else ""
    return f"{row['fusedbn_s'] / row['torch_s']:.2f}{tie}, {100 * row['fusedbn_roofline']:.0f} %"


def markdown(paths, root="."):
    """One table per machine and workload: fusedbn's time over eager torch's (< 1: fusedbn faster; 'tie'
    where the two are within the run's noise) and its fraction of the roofline, a column per dtype and mode.
    `paths` are relative to `root`; files that recorded no spreads (older runs) say that their ties are
    not marked."""
    machines = {}
    for path in paths:
        meta, rows = load_results(Path(root) / path)
        # Files of older runs do not record the thread count.
        key = (meta["machine"], meta["torch"], meta.get("threads"))
        entry = machines.setdefault(key, dict(paths=[], rows=[]))
        entry["paths"].append(str(path))
        entry["rows"] += rows
    out = []
    for (machine, torch_version, threads), entry in machines.items():
        files = ", ".join(f"`{p}`" for p in entry["paths"])
        where = f"**{machine}**" + (f", threads: {threads}" if threads else "")
        unmarked = any(verdict_of(r, "fusedbn", "torch") is None for r in entry["rows"])
        files += "; no spreads recorded, ties not marked" if unmarked else ""
        for workload in unique(r["workload"] for r in entry["rows"]):
            rows = [r for r in entry["rows"] if r["workload"] == workload]
            dtypes = unique(r["dtype"] for r in rows)
            modes = unique(r["mode"] for r in rows)
            cells = {(shape_str(r["shape"]), r["layout"], r["dtype"], r["mode"]): _ratio_cell(r) for r in rows}
            what = "" if workload == "bn" else f", {workload}"
            out += [f"{where}, torch {torch_version}{what} ({files}):", "",
                    "| shape | layout | " + " | ".join(f"{d} {m}" for d in dtypes for m in modes) + " |",
                    "|---|---|" + "---|" * (len(dtypes) * len(modes))]
            for shape, layout in unique((shape_str(r["shape"]), r["layout"]) for r in rows):
                out.append(f"| {shape} | {layout} | "
                           + " | ".join(cells.get((shape, layout, d, m), "") for d in dtypes for m in modes) + " |")
            out.append("")
    return "\n".join(out)


def readme_table(text, root):
    """(span of the generated block in README text, the block rendered afresh from the files it names)."""
    start = README_START.search(text)
    end = text.find(README_END, start.end()) if start else -1
    if end < 0:
        raise ValueError(f"no '<!-- bench-table: FILES -->' ... '{README_END}' block")
    return (start.end(), end), markdown(start["files"].split(), root)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="results JSON files written by bench.py --json")
    parser.add_argument("--readme", help="rewrite the generated table in this README (paths relative to it)")
    args = parser.parse_args(argv)
    if not args.readme:
        print(markdown(args.files))
        return
    readme = Path(args.readme)
    text = readme.read_text()
    (begin, end), rendered = readme_table(text, readme.parent)
    readme.write_text(text[:begin] + rendered + text[end:])


if __name__ == "__main__":
    main()
