"""Option parsing shared by commands: key opening, certificate files, times and durations.

Imports no CLI framework at module level: `keyseal verify` runs without click (keyseal._internal.cli.quick)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from keyseal.errors import UsageError

if TYPE_CHECKING:
    from keyseal._internal.backends import Signer

__all__ = [
    "KEK_DEFAULT",
    "KEK_SPECS",
    "F",
    "json_option",
    "kek_option",
    "kms_endpoint_option",
    "open_key",
    "parse_duration",
    "parse_rfc3339",
]

F = TypeVar("F", bound=Callable[..., Any])

_DURATION = re.compile(r"^(\d+)([smhdwy])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def kms_endpoint_option(func: F) -> F:
    """`--kms-endpoint URL`: override the KMS endpoint (else boto3's AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL)."""
    import click

    return click.option(
        "--kms-endpoint",
        metavar="URL",
        default=None,
        help="KMS endpoint URL (default: AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL, or AWS's own).",
    )(func)


# The KEK specs every --kek / --from-kek option takes, written once so every command's help names them all.
KEK_SPECS = "local, local:PATH, awskms:<key ARN> or vault:[MOUNT/]KEY"
KEK_DEFAULT = "default: $KEYSEAL_KEK, else local, the KEK file in $KEYSEAL_HOME"


def kek_option(func: F) -> F:
    """`--kek KEK`: the KEK that opens a wrapped `file:` key (else $KEYSEAL_KEK, else the local KEK)."""
    import click

    return click.option(
        "--kek",
        metavar="KEK",
        default=None,
        help=f"The KEK that unwraps a wrapped file: key: {KEK_SPECS} ({KEK_DEFAULT}).",
    )(func)


def json_option(func: F) -> F:
    """`--json`: the result as one JSON document on stdout, for scripts (keyseal._internal.cli.output)."""
    import click

    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as one JSON document (for scripts).")(func)


def open_key(uri: str, kms_endpoint: str | None, kek: str | None = None) -> Signer:
    from keyseal._internal.backends import BackendOptions, open_signer  # loaded by commands that sign, not by verify

    return open_signer(uri, BackendOptions(kms_endpoint=kms_endpoint, kek=kek))


def parse_rfc3339(value: str) -> int:
    """An RFC 3339 timestamp with an explicit offset or Z, as Unix seconds."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"invalid time {value!r}: use RFC 3339, e.g. 2026-01-31T12:00:00Z") from exc
    if moment.tzinfo is None:
        raise UsageError(f"time {value!r} has no offset: add Z or +HH:MM")
    seconds = int(moment.timestamp())
    if not 0 < seconds < 2**32:
        raise UsageError(f"time {value!r} is outside the range OpenPGP can record")
    return seconds


def parse_duration(value: str) -> int:
    """`90d`, `2y`, `12h`... as seconds."""
    match = _DURATION.match(value.strip())
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"invalid duration {value!r}: use a positive number and a unit, e.g. 90d, 2y, 12h")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


