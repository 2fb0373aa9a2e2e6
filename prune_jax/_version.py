"""The version of prune_jax, written here only: `prune_jax.__version__` imports it and
pyproject.toml reads it (setuptools' dynamic version, parsed without importing the package)."""

__version__ = "0.1.0"
