"""`keyseal federation --server URL`: the foreign trust domains' bundles a running server holds, and how fresh
they are (docs/federation.md). Reads the server's public /v1/federation; nothing is changed."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from keyseal.errors import BackendUnavailableError, InputError

__all__ = ["federation"]

MAX_ANSWER = 1 << 20


def _context(ca_file: Path | None) -> ssl.SSLContext:
    if ca_file is None:
        return ssl.create_default_context()
    from keyseal._internal.agent.main import read_trust_bundle

    try:
        text = ca_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read --ca-file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from exc
    return ssl.create_default_context(cadata=read_trust_bundle(text))


def _age(text: str | None, now: datetime) -> str:
    if not text:
        return "never"
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return f"{text} ({int((now - moment).total_seconds())}s ago)"


@click.command("federation")
@click.option("--server", "server_url", required=True, help="The server's API URL, e.g. https://keyseal:8443.")
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Trust for the server's certificate: PEM, or the trust domain's SPIFFE bundle (JSON). "
                   "Default: the system's roots.")
@click.option("--json", "as_json", is_flag=True, help="The server's answer as one JSON document.")
def federation(server_url: str, ca_file: Path | None, as_json: bool) -> None:
    """Show the federated trust bundles a running server holds, and when each was last refreshed."""
    url = server_url.rstrip("/") + "/v1/federation"
    if not url.startswith("https://"):
        raise InputError(f"--server {server_url!r} is not an https URL")
    try:
        with urllib.request.urlopen(url, timeout=15, context=_context(ca_file)) as answer:  # noqa: S310 - https only
            document: dict[str, Any] = json.loads(answer.read(MAX_ANSWER))
    except urllib.error.HTTPError as exc:
        raise BackendUnavailableError(f"{url} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise BackendUnavailableError(f"cannot read {url}: {reason}") from exc
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    rows = document.get("federatedBundles", [])
    if not rows:
        click.echo(f"{document.get('trustDomain', '?')} federates with no trust domain")
        return
    now = datetime.now(UTC)
    for row in rows:
        click.echo(f"{row['trustDomain']}  profile={row['profile']}  sequence={row['sequence']}  "
                   f"authorities={row['authorities']}  jwtKeys={row['jwtKeys']}")
        click.echo(f"    last refreshed: {_age(row.get('lastSuccess'), now)}")
        if row.get("lastError"):
            click.echo(f"    failing ({row['failures']} attempts): {row['lastError']}")
