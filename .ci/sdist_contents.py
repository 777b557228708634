"""Checks a source package's file list against the checkout (`make sdist` runs it):
    python .ci/sdist_contents.py dist/fusedbn-X.tar.gz
Every tracked file the build reads (csrc/ recursively, fusedbn/*.py, setup.py, pyproject.toml, README.md,
LICENSE, MANIFEST.in) must be in it, and no build output (*.so, *.o, build/). This catches what the install
check in `make sdist-check` cannot: it builds the CPU kernels only, so a CUDA or SIMT file left out would pass it.
"""
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ["csrc", "fusedbn/*.py", "setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"]

archive = Path(sys.argv[1])
with tarfile.open(archive) as tar:
    names = {Path(*Path(m.name).parts[1:]).as_posix() for m in tar.getmembers() if m.isfile()}
try:
    tracked = subprocess.run(["git", "ls-files", "--", *NEEDED], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
except (OSError, subprocess.CalledProcessError):
    sys.exit(print(f"sdist contents: no git checkout at {ROOT}, not checked") or 0)
if not tracked:
    sys.exit("sdist contents: git ls-files found none of the needed files")
missing = sorted(set(tracked) - names)
outputs = sorted(n for n in names if n.endswith((".so", ".o", ".pyd")) or n.startswith("build/"))
for name in missing:
    print(f"sdist contents: {archive.name} lacks {name} (add it to MANIFEST.in)")
for name in outputs:
    print(f"sdist contents: {archive.name} holds the build output {name} (exclude it in MANIFEST.in)")
if missing or outputs:
    sys.exit(1)
print(f"sdist contents: {archive.name} holds all {len(tracked)} tracked files the build needs, no build outputs")
