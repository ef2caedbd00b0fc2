"""keyseal's version, in one place (the package, pyproject.toml and every output that names it read it here)."""

__version__ = "0.1.0"
