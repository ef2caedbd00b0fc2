"""Which registry implementation the configured store means: SQLite and JSON files beside a directory store,
custom resources in a Kubernetes one. The abstractions (ca.registry.entries) never import their implementations."""

from __future__ import annotations

from typing import Any

from keyseal._internal.ca.config import Config
from keyseal._internal.ca.registry.entries import (
    AgentRegistry,
    DirectoryAgentRegistry,
    DirectoryJoinTokens,
    EntryStore,
    JoinTokens,
)

__all__ = ["agent_registry_for", "entry_store_for", "join_tokens_for"]


def entry_store_for(config: Config, api_client: Any = None, *, serving: bool = False) -> EntryStore:
    """The entries of the server's store (`api_client`: a Kubernetes ApiClient, else from the environment).
    `serving`: for the server, which answers every agent sync from it (a Kubernetes store then keeps a watched
    copy; the `keyseal entry` CLI reads the API directly instead)."""
    if config.store_type == "kubernetes":
        from keyseal._internal.ca.registry.kubernetes import KubeEntryStore

        return KubeEntryStore.from_config(config, api_client, watch=serving)
    from keyseal._internal.ca.registry.sqlite import DirectoryEntryStore

    return DirectoryEntryStore(config.store_path / f"{config.record_prefix}-entries.db", config.trust_domain,
                               legacy=config.store_path / f"{config.record_prefix}-entries.json")


def join_tokens_for(config: Config, api_client: Any = None) -> JoinTokens:
    """The join tokens of the server's store (`api_client` as for `entry_store_for`), with the configured
    longest token life and the store's registry of joined agents."""
    if config.store_type == "kubernetes":
        from keyseal._internal.ca.registry.kubernetes import KubeJoinTokens

        return KubeJoinTokens.from_config(config, api_client)
    return DirectoryJoinTokens(config.store_path / f"{config.record_prefix}-join-tokens.json", config.trust_domain,
                               config.join_token_max_ttl, agent_registry_for(config))


def agent_registry_for(config: Config, api_client: Any = None) -> AgentRegistry:
    """The registry of joined agents in the server's store (`api_client` as for `entry_store_for`)."""
    if config.store_type == "kubernetes":
        from keyseal._internal.ca.registry.kubernetes import KubeAgentRegistry

        return KubeAgentRegistry.from_config(config, api_client)
    return DirectoryAgentRegistry(config.store_path / f"{config.record_prefix}-agents.json")
