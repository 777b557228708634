# The one place the version is written: pyproject.toml reads it ([tool.setuptools.dynamic], statically,
# without importing fusedbn) and fusedbn/__init__.py exports it. Keep this a single literal assignment.
__version__ = "0.1.0"
