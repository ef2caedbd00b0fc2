"""`keyseal audit`: check the audit log's hash chain, and list what a key signed."""

from __future__ import annotations

import json
from pathlib import Path

import click

from keyseal.audit import ENV, configured_log, verify_log
from keyseal.cli.common import json_option
from keyseal.errors import AuditChainError, UsageError
from keyseal.inputfile import read_input

__all__ = ["audit"]

_LOG_HELP = f"The audit log (default: ${ENV}, else $KEYSEAL_HOME/audit.log)."


def _log_path(given: Path | None) -> Path:
    if given is not None:
        return given
    configured = configured_log()
    if configured is None:
        raise UsageError(f"the audit log is off ({ENV}=off): give --log FILE")
    return configured.path


@click.group()
def audit() -> None:
    """The audit log: one hash-chained line per signature keyseal made."""


@audit.command()
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), help=_LOG_HELP)
@click.option("--head", metavar="HEX",
              help="A head an earlier run printed: fail unless the log still holds that line (catches lines cut "
                   "from the end, or a log rewritten whole).")
@json_option
def verify(log_path: Path | None, head: str | None, as_json: bool) -> None:
    """Check the chain: exit 0 with the line count and head, or exit 1 naming the first broken line."""
    path = _log_path(log_path)
    report = verify_log(path, head)
    if as_json:
        from keyseal.cli.output import print_json

        print_json({"log": str(path), "lines": report.lines, "chain": "intact", "head": report.head})
        return
    click.echo(f"{report.lines} lines, chain intact, head {report.head}")


@audit.command()
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), help=_LOG_HELP)
@click.option("--key", "key", metavar="URI|FINGERPRINT",
              help="Only this key: its URI, sha256:<SPKI hex> fingerprint or OpenPGP fingerprint.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as they are stored (JSON lines).")
def show(log_path: Path | None, key: str | None, as_json: bool) -> None:
    """List the records (does not check the chain: run `keyseal audit verify` for that)."""
    path = _log_path(log_path)
    lines = read_input(path, "audit log").splitlines()
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise AuditChainError(f"line {number}: not an audit record (edited or damaged)")
        if key is not None and not _matches(record, key):
            continue
        if as_json:
            click.echo(raw.decode("ascii", "replace"))
        else:
            fields = ("seq", "time", "outcome", "purpose", "subject", "key_uri")
            click.echo("\t".join(_cell(record.get(name)) for name in fields))


def _cell(value: object) -> str:
    """A field for the terminal: control characters (a file name may hold any) escaped."""
    return "-" if value is None else str(value).encode("unicode_escape").decode("ascii")


def _matches(record: dict[str, object], key: str) -> bool:
    wanted = key.strip()
    fingerprint = str(record.get("key_fingerprint") or "")
    return (record.get("key_uri") == wanted
            or fingerprint.lower() in (wanted.lower(), "sha256:" + wanted.lower())
            or str(record.get("openpgp_fingerprint") or "").upper() == wanted.upper().replace(" ", ""))
