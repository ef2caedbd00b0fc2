"""`keyseal entry create|list|delete|join-token --config FILE`: registration entries and agent join tokens.

They edit the server's store directly (the same configuration file as `keyseal server`); a running server sees
a change at the next agent sync."""

from __future__ import annotations

import json
from pathlib import Path

import click

from keyseal.ca.config import parse_duration

__all__ = ["entry"]

_CONFIG = click.option("--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
                       help="The trust-domain server's YAML configuration.")


def seconds_of(text: str | None, where: str) -> int:
    return 0 if text is None else int(parse_duration(text, where).total_seconds())


def _load(config_path: Path):  # type: ignore[no-untyped-def]
    from keyseal.ca.config import load_config

    return load_config(config_path)


@click.group("entry")
def entry() -> None:
    """Registration entries (selectors -> SPIFFE ID) for node agents, and agent join tokens."""


@entry.command("create")
@_CONFIG
@click.option("--spiffe-id", required=True, help="The SPIFFE ID the matching workloads get.")
@click.option("--parent", "parent_id", required=True,
              help="The agent's SPIFFE ID (spiffe://TD/keyseal/agent/NAME), or a prefix of several agents' IDs.")
@click.option("--selector", "selectors", multiple=True, required=True,
              help="unix:uid:N, unix:gid:N or unix:path:/abs/exe; a workload must match all of them.")
@click.option("--x509-ttl", default=None, help="X.509-SVID lifetime (at most the server's x509SVID.ttl).")
@click.option("--jwt-ttl", default=None, help="JWT-SVID lifetime (at most the server's jwtSVID.ttl).")
@click.option("--federates-with", "federates_with", multiple=True, metavar="TRUST_DOMAIN",
              help="A foreign trust domain (in federation.trustDomains) whose bundle the workloads get; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the entry as one JSON document (for scripts).")
def create(config_path: Path, spiffe_id: str, parent_id: str, selectors: tuple[str, ...], x509_ttl: str | None,
           jwt_ttl: str | None, federates_with: tuple[str, ...], as_json: bool) -> None:
    """Create an entry; prints its ID."""
    from keyseal.ca.entries import entry_store_for

    store = entry_store_for(_load(config_path))
    created = store.create(spiffe_id, parent_id, selectors, seconds_of(x509_ttl, "--x509-ttl"),
                           seconds_of(jwt_ttl, "--jwt-ttl"), federates_with)
    click.echo(json.dumps(created.to_json(), indent=2) if as_json else created.entry_id)


@entry.command("list")
@_CONFIG
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def list_entries(config_path: Path, as_json: bool) -> None:
    """List the entries."""
    from keyseal.ca.entries import entry_store_for

    entries = entry_store_for(_load(config_path)).entries()
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    for item in entries:
        federated = f"  federatesWith={','.join(item.federates_with)}" if item.federates_with else ""
        click.echo(f"{item.entry_id}  {item.spiffe_id}  parent={item.parent_id}  {' '.join(item.selectors)}"
                   f"{federated}")


@entry.command("delete")
@_CONFIG
@click.argument("entry_id")
def delete(config_path: Path, entry_id: str) -> None:
    """Delete an entry: its workloads stop receiving SVIDs at the agents' next sync."""
    from keyseal.ca.entries import entry_store_for

    entry_store_for(_load(config_path)).delete(entry_id)


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

    from keyseal.ca.entries import join_tokens_for

    token, agent_id = join_tokens_for(_load(config_path)).issue(
        agent_name, timedelta(seconds=seconds_of(ttl, "--ttl")), replace=replace)
    if as_json:
        click.echo(json.dumps({"token": token, "agentID": agent_id, "ttl": ttl}, indent=2))
        return
    click.echo(token)  # alone on stdout: TOKEN=$(keyseal entry join-token ...)
    click.echo(f"agent SPIFFE ID: {agent_id}", err=True)
