"""Results on stdout: labelled lines for people (`label:  value`, labels aligned), or one JSON document for
scripts (`--json`). Imports no CLI framework."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["labelled", "print_json", "print_labelled"]


def labelled(fields: Sequence[tuple[str, object]]) -> str:
    """`label:  value` lines, the values aligned one column after the longest label."""
    if not fields:
        return ""
    width = max(len(label) for label, _ in fields) + 2
    return "".join(f"{label + ':':<{width}}{value}\n" for label, value in fields)


def print_labelled(fields: Sequence[tuple[str, object]]) -> None:
    sys.stdout.write(labelled(fields))
    sys.stdout.flush()


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()
