"""The layrot version (one place: pyproject reads it, the Hello carries it)."""

__version__ = "0.1.0"
