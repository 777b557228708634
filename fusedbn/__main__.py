"""`python -m fusedbn`: what was built, what will run, and a self-check (fusedbn/_info.py)."""
import sys

from ._info import main

sys.exit(main())
