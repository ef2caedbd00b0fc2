"""keyseal internals (see keyseal/_internal/__init__.py)."""
