"""`keyseal entry create|list|delete|join-token --config FILE`: registration entries and agent join tokens.

They edit the server's store directly (the same configuration file as `keyseal server`); a running server sees
a change at the next agent sync."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from keyseal._internal.durations import parse_duration

if TYPE_CHECKING:
    from keyseal._internal.ca.registry.entries import Entry

__all__ = ["entry"]

_CONFIG = click.option("--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
                       help="The trust-domain server's YAML configuration.")


def seconds_of(text: str | None, where: str) -> int:
    return 0 if text is None else int(parse_duration(text, where).total_seconds())


def _load(config_path: Path):  # type: ignore[no-untyped-def]
    from keyseal._internal.ca.config import load_config

    return load_config(config_path)


@click.group("entry")
def entry() -> None:
    """Registration entries (selectors -> SPIFFE ID) for node agents, and agent join tokens."""


@entry.command("create")
@_CONFIG
@click.option("--spiffe-id", default=None, help="The SPIFFE ID the matching workloads get.")
@click.option("--parent", "parent_id", default=None,
              help="The agent's SPIFFE ID (spiffe://TD/keyseal/agent/NAME), or a prefix of several agents' IDs.")
@click.option("--selector", "selectors", multiple=True,
              help="unix:uid:N, unix:gid:N or unix:path:/abs/exe; a workload must match all of them.")
@click.option("--x509-ttl", default=None, help="X.509-SVID lifetime (at most the server's x509SVID.ttl).")
@click.option("--jwt-ttl", default=None, help="JWT-SVID lifetime (at most the server's jwtSVID.ttl).")
@click.option("--federates-with", "federates_with", multiple=True, metavar="TRUST_DOMAIN",
              help="A foreign trust domain (in federation.trustDomains) whose bundle the workloads get; repeatable.")
@click.option("--dns-name", "dns_names", multiple=True, metavar="NAME",
              help="A DNS name the workloads' X.509-SVIDs carry (a DNS SAN after the SPIFFE ID; RFC 1123, no "
                   "wildcards); repeatable.")
@click.option("--from-file", "from_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Create many: JSON lines, one entry each, as `entry list --json-lines` prints them (entry_id "
                   "optional). All are checked before any is written.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the entry as one JSON document (with --from-file: one JSON line per entry).")
def create(config_path: Path, spiffe_id: str | None, parent_id: str | None, selectors: tuple[str, ...],
           x509_ttl: str | None, jwt_ttl: str | None, federates_with: tuple[str, ...], dns_names: tuple[str, ...],
           from_file: Path | None, as_json: bool) -> None:
    """Create an entry (or, with --from-file, many); prints each one's ID."""
    from keyseal._internal.ca.registry.stores import entry_store_for
    from keyseal._internal.progress import items_done, meter
    from keyseal.errors import UsageError

    if from_file is not None:
        if spiffe_id or parent_id or selectors or x509_ttl or jwt_ttl or federates_with or dns_names:
            raise UsageError("give either --from-file or one entry's options (--spiffe-id, --parent, --selector)")
        entries, labels = _read_entries(from_file)
        store = entry_store_for(_load(config_path))
        with meter(len(entries), "entry", "creating entries"):
            created_many = store.create_many(entries, labels, progress=items_done)
        for created in created_many:
            click.echo(json.dumps(created.to_json()) if as_json else created.entry_id)
        return
    if not spiffe_id or not parent_id or not selectors:
        raise UsageError("give --spiffe-id, --parent and at least one --selector (or --from-file)")
    store = entry_store_for(_load(config_path))
    created = store.create(spiffe_id, parent_id, selectors, seconds_of(x509_ttl, "--x509-ttl"),
                           seconds_of(jwt_ttl, "--jwt-ttl"), federates_with, dns_names)
    click.echo(json.dumps(created.to_json(), indent=2) if as_json else created.entry_id)


_FIELDS = {"entry_id", "spiffe_id", "parent_id", "selectors", "x509_ttl", "jwt_ttl", "federates_with", "dns_names"}


def _read_entries(path: Path) -> tuple[list[Entry], list[str]]:
    """The entries of a JSON-lines file and a label per entry naming its line; blank lines are skipped."""
    from keyseal._internal.ca.registry.entries import Entry
    from keyseal._internal.inputfile import read_input
    from keyseal.errors import UsageError

    entries: list[Entry] = []
    labels: list[str] = []
    for number, line in enumerate(read_input(path, "entries file").splitlines(), 1):
        if not line.strip():
            continue
        label = f"{path} line {number}"
        try:
            document = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"{label}: not JSON (one entry per line, as `keyseal entry list --json` prints "
                             f"them)") from exc
        if not isinstance(document, dict):
            raise UsageError(f"{label}: not a JSON object")
        unknown = sorted(set(document) - _FIELDS)
        missing = sorted({"spiffe_id", "parent_id", "selectors"} - set(document))
        if unknown or missing:
            raise UsageError(f"{label}: " + (f"unknown field {unknown[0][:40]!r}" if unknown
                                             else f"missing field {missing[0]!r}"))
        selectors = document["selectors"]
        ttls = (document.get("x509_ttl", 0), document.get("jwt_ttl", 0))
        entry_id = document.get("entry_id") or ""
        federates_with = document.get("federates_with", [])
        if not isinstance(federates_with, list) or not all(isinstance(t, str) for t in federates_with):
            raise UsageError(f"{label}: federates_with must be a list of trust domain names")
        dns_names = document.get("dns_names", [])
        if not isinstance(dns_names, list) or not all(isinstance(n, str) for n in dns_names):
            raise UsageError(f"{label}: dns_names must be a list of DNS names")
        if not isinstance(selectors, list) or not all(isinstance(s, str) for s in selectors) \
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ttls) \
                or not all(isinstance(document[k], str) for k in ("spiffe_id", "parent_id")) \
                or not isinstance(entry_id, str):
            raise UsageError(f"{label}: selectors must be a list of strings, TTLs whole seconds, IDs strings")
        entries.append(Entry(entry_id, document["spiffe_id"], document["parent_id"], tuple(selectors), *ttls,
                             tuple(federates_with), tuple(dns_names)))
        labels.append(label)
    if not entries:
        raise UsageError(f"{path}: no entries in it")
    return entries, labels


@entry.command("list")
@_CONFIG
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@click.option("--json-lines", "as_lines", is_flag=True,
              help="One JSON object per line: what `entry create --from-file` reads.")
def list_entries(config_path: Path, as_json: bool, as_lines: bool) -> None:
    """List the entries."""
    from keyseal._internal.ca.registry.stores import entry_store_for

    entries = entry_store_for(_load(config_path)).entries()
    if as_lines:
        for item in entries:
            click.echo(json.dumps(item.to_json()))
        return
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    for item in entries:
        federated = f"  federatesWith={','.join(item.federates_with)}" if item.federates_with else ""
        dns = f"  dnsNames={','.join(item.dns_names)}" if item.dns_names else ""
        click.echo(f"{item.entry_id}  {item.spiffe_id}  parent={item.parent_id}  {' '.join(item.selectors)}"
                   f"{federated}{dns}")


@entry.command("delete")
@_CONFIG
@click.argument("entry_id", required=False)
@click.option("--selector", "selectors", multiple=True,
              help="Delete every entry that has all of these selectors (instead of one ENTRY_ID).")
@click.option("--parent", "parent_id", default=None, help="With --selector: only entries of this parent.")
def delete(config_path: Path, entry_id: str | None, selectors: tuple[str, ...], parent_id: str | None) -> None:
    """Delete an entry, or with --selector every entry that has those selectors (prints their IDs): their
    workloads stop receiving SVIDs at the agents' next sync."""
    from keyseal._internal.ca.registry.stores import entry_store_for
    from keyseal._internal.progress import items_done, meter
    from keyseal.errors import UsageError

    if (entry_id is None) == (not selectors) or (parent_id is not None and not selectors):
        raise UsageError("give one ENTRY_ID, or --selector (and optionally --parent) to delete many")
    store = entry_store_for(_load(config_path))
    if entry_id is not None:
        store.delete(entry_id)
        return
    doomed = store.matching(selectors, parent_id)
    if not doomed:
        raise UsageError("no entry has all of these selectors" + (" under that parent" if parent_id else ""))
    with meter(len(doomed), "entry", "deleting entries"):
        store.delete_many([e.entry_id for e in doomed], progress=items_done)
    for gone in doomed:
        click.echo(gone.entry_id)


@entry.command("join-token")
@_CONFIG
@click.option("--agent", "agent_name", required=True, help="The agent's name (e.g. the node name).")
@click.option("--ttl", default="10m", show_default=True,
              help="How long the token may be redeemed (at most the server's agents.joinTokenMaxTTL).")
@click.option("--replace", is_flag=True,
              help="Forget the agent first, so the token joins even though it still holds an unexpired SVID (e.g. "
                   "its node lost its saved state); needs delete on joinedagents or write access to the store.")
@click.option("--json", "as_json", is_flag=True, help="Print the token and the agent's SPIFFE ID as one JSON document.")
def join_token(config_path: Path, agent_name: str, ttl: str, replace: bool, as_json: bool) -> None:
    """Issue a one-time join token for an agent; prints the token (keep it secret) and the agent's SPIFFE ID.
    Whoever holds the token becomes that agent: issuing one is as sensitive as administering the CA."""
    from datetime import timedelta

    from keyseal._internal.ca.registry.stores import join_tokens_for

    token, agent_id = join_tokens_for(_load(config_path)).issue(
        agent_name, timedelta(seconds=seconds_of(ttl, "--ttl")), replace=replace)
    if as_json:
        click.echo(json.dumps({"token": token, "agentID": agent_id, "ttl": ttl}, indent=2))
        return
    click.echo(token)  # alone on stdout: TOKEN=$(keyseal entry join-token ...)
    click.echo(f"agent SPIFFE ID: {agent_id}", err=True)
