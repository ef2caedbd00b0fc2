"""Join tokens as an attacker with only `create` on jointokens (or write access to the token file) uses them: a
token object that claims any expiry, or names an agent that is running. Against a real server on 127.0.0.1, on
the directory store and on the Kubernetes store (the API emulator)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from keyseal._internal.ca.registry.entries import JoinTokens, token_digest
from keyseal._internal.ca.registry.stores import join_tokens_for
from keyseal._internal.ca.server import CaServer
from keyseal.errors import UsageError
from tests.conftest import assert_one_line_error, run_keyseal
from tests.harness.agent import agent_call, start_server
from tests.harness.ca import TRUST_DOMAIN, make_csr, new_key
from tests.harness.kms_emulator import KmsEmulator
from tests.harness.kube_api import KubeApi

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

PREFIX = "keyseal-example.org"


class Clock:
    """The server's clock, moved by the test."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def _store(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    if kind == "directory":
        return {"overrides": {}, "api": None}
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube_api: KubeApi = request.getfixturevalue("kube_api")
    namespace: str = request.getfixturevalue("namespace")
    return {"overrides": {"store": {"type": "kubernetes",
                                    "kubernetes": {"namespace": namespace, "apiServer": kube_api.url}}},
            "api": kube_api, "namespace": namespace}


@pytest.fixture(params=["directory", "kubernetes"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return _store(request.param, request, tmp_path, monkeypatch)


@pytest.fixture
def kube_store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The Kubernetes store alone: for what only its API server can do (stop serving a resource type, fail)."""
    return _store("kubernetes", request, tmp_path, monkeypatch)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _server(tmp_path: Path, store: dict[str, Any], clock: Clock) -> CaServer:
    return start_server(tmp_path, clock=clock, x509SVID={"ttl": "2m"}, **store["overrides"])


@pytest.fixture
def server(tmp_path: Path, store: dict[str, Any], clock: Clock) -> Iterator[CaServer]:
    server = _server(tmp_path, store, clock)
    yield server
    server.shutdown()


@pytest.fixture
def kube_server(tmp_path: Path, kube_store: dict[str, Any], clock: Clock) -> Iterator[CaServer]:
    server = _server(tmp_path, kube_store, clock)
    yield server
    server.shutdown()


def tokens(server: CaServer, store: dict[str, Any]) -> JoinTokens:
    api = store["api"]
    return join_tokens_for(server.config, api.api_client() if api is not None else None)


def join(server: CaServer, token: str) -> tuple[int, Any]:
    return agent_call(server, None, "/v1/agent/join", {"token": token, "csr": make_csr(new_key())})


def plant(server: CaServer, store: dict[str, Any], token: str, agent: str, expires: str, **spec: Any) -> None:
    """A token written the way someone with create on jointokens (or write access to the file) would: any
    agent, any expiry, bypassing `keyseal entry join-token`."""
    agent_id = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/{agent}"
    if store["api"] is None:
        import json

        path = server.config.store_path / f"{PREFIX}-join-tokens.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        stamp = int(datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
        created = int(datetime.now(UTC).timestamp())  # as keyseal writes it (whoever writes the file is trusted)
        data.setdefault("tokens", {})[token_digest(token)] = {"agent_id": agent_id, "expires": stamp,
                                                              "created": created, **spec}
        path.write_text(json.dumps(data))
        return
    body = {"apiVersion": "keyseal.dev/v1", "kind": "JoinToken",
            "metadata": {"name": f"{PREFIX}-join-{token_digest(token)}"},
            "spec": {"agentID": agent_id, "expiresAt": expires, **spec}}
    kubernetes.client.CustomObjectsApi(store["api"].api_client()).create_namespaced_custom_object(
        "keyseal.dev", "v1", store["namespace"], "jointokens", body)


def test_a_token_claiming_a_far_expiry_lives_only_the_maximum(server: CaServer, store: dict[str, Any],
                                                              clock: Clock) -> None:
    """expiresAt 2099 is not believed: a token is good for at most agents.joinTokenMaxTTL (default 1h) from when
    the store says it was created (the API server's creationTimestamp), and one that claims more is refused."""
    assert server.config.join_token_max_ttl == timedelta(hours=1)
    soon = (datetime.now(UTC) + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    later = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    plant(server, store, "planted-far-future-token-1", "node-9", "2099-01-01T00:00:00Z")
    plant(server, store, "planted-two-hours-token-2", "node-8", later)
    plant(server, store, "planted-two-hours-token-3", "node-7", later)
    plant(server, store, "planted-half-hour-token-4", "node-6", soon)
    status, answer = join(server, "planted-far-future-token-1")
    assert status == 401 and answer["error"] == "unauthenticated", answer
    assert join(server, "planted-two-hours-token-2")[0] == 401  # claims more than the maximum
    assert join(server, "planted-half-hour-token-4")[0] == 200  # within the bound it works
    clock.offset = timedelta(hours=1, minutes=1)  # now it claims less than the maximum, but is older than it
    assert join(server, "planted-two-hours-token-3")[0] == 401


def test_issuing_a_token_beyond_the_maximum_is_refused(server: CaServer, store: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match="at most 3600s"):
        tokens(server, store).issue("node-1", timedelta(hours=2))


def test_a_token_for_an_agent_that_holds_an_svid_is_refused_until_an_administrator_replaces_it(
        server: CaServer, store: dict[str, Any], clock: Clock) -> None:
    """Someone who can create tokens must not quietly become a running agent: a token for an agent whose SVID has
    not expired is refused, and kept (a refusal spends nothing); `issue(replace=True)` (the CLI's --replace, with
    the store administrator's access) forgets the agent first, and its token is honoured; once the SVID expired,
    a plain token works again."""
    first, _ = tokens(server, store).issue("node-1", timedelta(minutes=5))
    status, answer = join(server, first)
    assert status == 200, answer
    second, _ = tokens(server, store).issue("node-1", timedelta(minutes=5))
    status, answer = join(server, second)
    assert status == 400 and "still holds an unexpired X.509-SVID" in answer["message"], answer
    assert "--replace" in answer["message"]
    assert join(server, second)[0] == 400  # refused again: not spent
    plant(server, store, "planted-for-a-running-agent", "node-1", (datetime.now(UTC) + timedelta(minutes=5))
          .strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert join(server, "planted-for-a-running-agent")[0] == 400
    third, _ = tokens(server, store).issue("node-1", timedelta(minutes=5), replace=True)
    status, answer = join(server, third)
    assert status == 200, answer
    assert join(server, second)[0] == 400  # the new agent is recorded: the old token is refused again
    clock.offset = server.config.x509_ttl + timedelta(seconds=5)  # its SVID expired: a plain token works
    fourth, _ = tokens(server, store).issue("node-1", timedelta(minutes=5), now=clock())
    assert join(server, fourth)[0] == 200


def test_join_token_cli_replace_and_ttl(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        import yaml

        from tests.harness.ca import base_config

        config = tmp_path / "keyseal.yaml"
        config.write_text(yaml.safe_dump(base_config(tmp_path)))
        result = run_keyseal("entry", "join-token", "--config", config, "--agent", "node-1", "--ttl", "2h")
        assert_one_line_error(result)
        assert "at most" in result.stderr
        for args in ((), ("--replace",)):
            result = run_keyseal("entry", "join-token", "--config", config, "--agent", "node-1", *args)
            assert result.returncode == 0, result.stderr
            assert join(server, result.stdout.strip())[0] == 200
    finally:
        server.shutdown()


def test_a_token_that_says_replace_itself_does_not_take_over_a_running_agent(
        server: CaServer, store: dict[str, Any]) -> None:
    """Whoever may create tokens may write anything into one: a token that says `replace: true` (spec.replace, or
    "replace" in the token file, as keyseal once wrote them) is refused like any other for a running agent."""
    first, _ = tokens(server, store).issue("node-1", timedelta(minutes=5))
    assert join(server, first)[0] == 200
    expires = (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    plant(server, store, "planted-replace-token", "node-1", expires, replace=True)
    status, answer = join(server, "planted-replace-token")
    assert status == 400 and "still holds an unexpired X.509-SVID" in answer["message"], answer


def test_a_registry_that_cannot_be_read_refuses_the_join_and_keeps_the_token(
        kube_server: CaServer, kube_store: dict[str, Any]) -> None:
    """The JoinedAgent resource type stops being served (its CRD deleted, or never applied after an upgrade): a
    join is refused, not waved through as if no agent were running, and the token is not spent by the failure.
    (The directory store's registry is a file beside the tokens: it cannot go missing on its own.)"""
    server, store = kube_server, kube_store
    token, _ = tokens(server, store).issue("node-2", timedelta(minutes=5))
    store["api"].handler.unserved.add("joinedagents")
    try:
        status, answer = join(server, token)
    finally:
        store["api"].handler.unserved.discard("joinedagents")
    assert status != 200 and "joinedagents.keyseal.dev" in answer["message"], answer
    status, answer = join(server, token)
    assert status == 200, answer


def test_a_kubernetes_failure_during_a_join_does_not_spend_the_token(
        kube_server: CaServer, kube_store: dict[str, Any]) -> None:
    """The API server fails while the registry of joined agents is read (503): the join is answered 503, and the
    same token joins once the API server is well again."""
    server, store = kube_server, kube_store
    token, _ = tokens(server, store).issue("node-3", timedelta(minutes=5))
    store["api"].handler.failing.add("joinedagents")
    try:
        status, answer = join(server, token)
    finally:
        store["api"].handler.failing.discard("joinedagents")
    assert status == 503, answer
    status, answer = join(server, token)
    assert status == 200, answer


def test_a_signing_failure_during_a_join_does_not_spend_the_token(
        tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str]) -> None:
    """The CA's key manager refuses to sign (KMS custody, Sign denied): the join is answered 503, and the same
    token joins once KMS signs again."""
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    server = start_server(tmp_path, custody="kms",
                          aws={"endpoints": {"kms": kms_emulator.endpoint}, "keyManager": {"aliasPrefix": prefix}})
    try:
        token, _ = join_tokens_for(server.config).issue("node-4", timedelta(minutes=5))
        kms_emulator.deny(aws_env["AWS_ACCESS_KEY_ID"], "Sign")
        try:
            status, answer = join(server, token)
        finally:
            kms_emulator.allow_all()
        assert status == 503, answer
        status, answer = join(server, token)
        assert status == 200, answer
    finally:
        server.shutdown()


def test_the_server_does_not_start_without_the_joinedagent_crd(tmp_path: Path, kube_store: dict[str, Any]) -> None:
    """`helm upgrade` does not install a CRD the chart gained: the server refuses to start, in one line naming
    the CRD to apply, rather than run with the running-agent check silently off."""
    store = kube_store
    store["api"].handler.unserved.add("joinedagents")
    try:
        with pytest.raises(UsageError) as raised:
            start_server(tmp_path, **store["overrides"]).shutdown()
    finally:
        store["api"].handler.unserved.discard("joinedagents")
    message = str(raised.value)
    assert "\n" not in message and "deploy/crds/joinedagents.keyseal.dev.yaml" in message, message
