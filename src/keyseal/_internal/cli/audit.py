"""`keyseal audit`: check the audit log's hash chain, and list what a key signed."""

from __future__ import annotations

import json
from pathlib import Path

import click

from keyseal._internal.audit import ENV, AuditLog, checkpoint, configured_log, verify_log
from keyseal._internal.audit.chain import read_copies
from keyseal._internal.cli.common import json_option
from keyseal._internal.inputfile import read_input
from keyseal.errors import AuditChainError, UsageError

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
    """The audit log: one hash-chained line per signature keyseal made, with signed checkpoints."""


@audit.command()
@click.option("--log", "log_paths", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help=_LOG_HELP + " Repeat for rotated files, oldest first: each must go on from the one before.")
@click.option("--head", metavar="HEX",
              help="A head an earlier run printed: fail unless the log still holds that line (catches lines cut "
                   "from the end, or a log rewritten whole).")
@click.option("--key", "key_files", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="A public key or certificate (PEM or DER) of a key that signs into this log: check every "
                   "checkpoint's signature, and that none was removed. Repeat for each key.")
@click.option("--checkpoints", "copy_files", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="A file with checkpoint copies taken off the host (e.g. the server's log lines): the log must "
                   "still hold each one's head (catches a cut end or a replaced log).")
@click.option("--every", type=click.IntRange(min=0), default=None,
              help="Lines allowed without a checkpoint in a log that has none yet (default: "
                   f"${checkpoint.LINES_ENV} or {checkpoint.DEFAULT_LINES}; after a checkpoint, the interval it "
                   "signs); 0: ask nothing of the lines before the first checkpoint (a log kept from before "
                   "keyseal made them).")
@json_option
def verify(log_paths: tuple[Path, ...], head: str | None, key_files: tuple[Path, ...],
           copy_files: tuple[Path, ...], every: int | None, as_json: bool) -> None:
    """Check the chain: exit 0 with the line count and head, or exit 1 naming the first broken line."""
    paths = list(log_paths) or [_log_path(None)]
    keys = checkpoint.load_keys(key_files) if key_files else None
    copies = [copy for file in copy_files for copy in read_copies(file)]
    report = verify_log(paths, head, keys=keys, every=every, copies=copies)
    if as_json:
        from keyseal._internal.cli.output import print_json

        print_json({"log": str(paths[-1]), "logs": [str(p) for p in paths], "lines": report.lines,
                    "chain": "intact", "head": report.head, "continued_from": report.continued_from,
                    "checkpoints": report.checkpoints, "checkpoint_signatures_checked": keys is not None,
                    "copies_checked": report.copies_checked})
        return
    click.echo(f"{report.lines} lines, chain intact, head {report.head}")
    if report.continued_from is not None:
        click.echo(f"goes on from a rotated file with head {report.continued_from} (give it first with --log to "
                   f"check the link)")
    if keys is None and report.checkpoints:
        click.echo(f"{report.checkpoints} checkpoints, signatures not checked (give --key)")
    elif keys is not None:
        click.echo(f"{report.checkpoints} checkpoints, each signature valid; {report.after_last_checkpoint} lines "
                   f"after the last one (a cut there shows only against a copy taken off the host)")
    if copies:
        click.echo(f"{report.copies_checked} of {len(copies)} checkpoint copies found in the log (the others "
                   f"are older than the files given)")


@audit.command()
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), help=_LOG_HELP)
@click.option("--to", "archive", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to move the current file (default: beside it, named with the UTC time).")
def rotate(log_path: Path | None, archive: Path | None) -> None:
    """Move the log aside and start a new file that goes on from its head (instead of moving it by hand, which
    starts an unlinked chain)."""
    path = _log_path(log_path)
    if not path.exists():
        raise UsageError(f"the audit log {path} does not exist: nothing to rotate")
    moved = AuditLog(path).rotate(archive)
    click.echo(f"moved the audit log to {moved}; {path} goes on from its head")


@audit.command(name="checkpoint")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), help=_LOG_HELP)
@click.option("--key", "key_uri", required=True, metavar="URI", help="The key that signs the checkpoint.")
def checkpoint_command(log_path: Path | None, key_uri: str) -> None:
    """Sign the log's head now with KEY and print the checkpoint line (keep it off the host: a CI log, a
    ticket), e.g. at the end of a release job."""
    from keyseal._internal.audit import Custody, key_fingerprint, redact_uri, unwrap
    from keyseal._internal.backends import open_signer

    path = _log_path(log_path)
    if not path.exists():
        raise UsageError(f"the audit log {path} does not exist")
    with open_signer(key_uri) as signer:
        inner = unwrap(signer)
        custody = Custody(inner, key_fingerprint(inner.public_key()), redact_uri(key_uri))
        made = AuditLog(path).checkpoint(custody, force=True)
    if made is None:
        click.echo("the log's last line is a checkpoint already (or the log is empty): nothing to sign")
    else:
        click.echo(json.dumps(made, separators=(",", ":")))


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
            cells = [_cell(record.get(name)) for name in fields]
            if "kind" in record:  # a checkpoint or the start of a rotated file: no outcome, its kind instead
                cells[2] = _cell(record["kind"])
            click.echo("\t".join(cells))


def _cell(value: object) -> str:
    """A field for the terminal: control characters (a file name may hold any) escaped."""
    return "-" if value is None else str(value).encode("unicode_escape").decode("ascii")


def _matches(record: dict[str, object], key: str) -> bool:
    wanted = key.strip()
    fingerprint = str(record.get("key_fingerprint") or "")
    return (record.get("key_uri") == wanted
            or fingerprint.lower() in (wanted.lower(), "sha256:" + wanted.lower())
            or str(record.get("openpgp_fingerprint") or "").upper() == wanted.upper().replace(" ", ""))
