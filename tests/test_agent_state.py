"""The agent's own SVID across a restart: kept as a wrapped record (local KEK) and a certificate, never in the
clear; a restarted agent resumes without a join token; a tampered record is refused."""

from __future__ import annotations

import base64
import json
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient

from keyseal._internal.ca.registry.stores import join_tokens_for
from keyseal.errors import KeysealError
from tests.harness.agent import AGENT_ID, start_agent, start_server
from tests.harness.ca import TRUST_DOMAIN

ME = f"unix:uid:{os.getuid()}"


def test_restart_resumes_the_saved_svid_and_a_tampered_record_is_refused(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    state = tmp_path / "state"
    token, _ = join_tokens_for(server.config).issue("node-1", timedelta(minutes=5))
    try:
        node = start_agent(server, tmp_path, token=token, state_dir=state)
        try:
            node.entry("/ns/a/state", ME)
            node.agent.cache.sync(renew_agent=True)  # every renewal is saved too
            assert node.agent.client.key is not None and node.agent.client.certificate is not None
            key_der = node.agent.client.key.private_bytes(serialization.Encoding.DER,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption())
            before = node.agent.client.certificate
        finally:
            node.stop()
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        files = {p.name: p for p in state.iterdir() if p.is_file()}
        assert {"agent-svid-key", "agent-svid.pem", "kek"} <= set(files)
        assert stat.S_IMODE(files["kek"].stat().st_mode) == 0o600
        for path in files.values():  # the key is nowhere on disk in the clear
            data = path.read_bytes()
            assert key_der not in data and key_der[-32:] not in data and b"PRIVATE KEY" not in data
        record = json.loads(files["agent-svid-key"].read_text())
        assert record["format"] == "keyseal.wrapped-key.v1" and record["kekProvider"] == "local"
        assert before.public_bytes(serialization.Encoding.PEM) == files["agent-svid.pem"].read_bytes()

        again = start_agent(server, tmp_path, token=token, state_dir=state)  # the token is spent: no join
        try:
            resumed = again.agent.client.certificate
            assert resumed is not None and resumed.serial_number != before.serial_number  # renewed at resume
            assert again.agent.cache.server_reachable
            with WorkloadApiClient(again.endpoint, default_timeout=10) as client:
                assert str(client.fetch_x509_svid().spiffe_id) == f"spiffe://{TRUST_DOMAIN}/ns/a/state"
        finally:
            again.stop()
        san = resumed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [AGENT_ID]

        record = json.loads(files["agent-svid-key"].read_text())
        raw = bytearray(base64.b64decode(record["ciphertext"]))
        raw[5] ^= 1
        record["ciphertext"] = base64.b64encode(bytes(raw)).decode()
        files["agent-svid-key"].write_text(json.dumps(record, sort_keys=True, indent=2, ensure_ascii=True) + "\n")
        with pytest.raises(KeysealError) as refused:
            start_agent(server, tmp_path, token=token, state_dir=state)
        assert "tampered" in refused.value.message
    finally:
        server.shutdown()


def test_without_state_or_token_the_agent_says_what_to_do(tmp_path: Path) -> None:
    from keyseal._internal.agent.config import parse_agent_config
    from keyseal.errors import UsageError

    base = {"trustDomain": TRUST_DOMAIN, "serverURL": "https://127.0.0.1:8443", "trustBundleFile": "/b.pem"}
    with pytest.raises(UsageError) as refused:
        parse_agent_config(base, environ={})
    assert "join token" in refused.value.message
    config = parse_agent_config({**base, "stateDir": str(tmp_path / "s")}, environ={})
    assert config.state_kek_file == tmp_path / "s" / "kek" and not config.join_token
    with pytest.raises(UsageError):
        parse_agent_config({**base, "stateKekFile": str(tmp_path / "k")}, environ={})


def test_token_file_and_kek_per_node(tmp_path: Path) -> None:
    """With saved state a node's token file may be gone (it was needed for the first join only); without, that
    is an error. `${NODE_NAME}` picks the node's own token and KEK file, and the state directory is kept 0700."""
    from keyseal._internal.agent.config import parse_agent_config
    from keyseal._internal.agent.state import AgentState
    from keyseal.errors import InputError, UsageError

    base = {"trustDomain": TRUST_DOMAIN, "serverURL": "https://127.0.0.1:8443", "trustBundleFile": "/b.pem",
            "joinTokenFile": str(tmp_path / "tokens" / "${NODE_NAME}")}
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "node-1").write_text("token-of-node-1\n")
    node = {"NODE_NAME": "node-1"}
    assert parse_agent_config(base, environ=node).join_token == "token-of-node-1"
    with pytest.raises(InputError, match="does not exist"):
        parse_agent_config(base, environ={"NODE_NAME": "node-2"})
    state = {**base, "stateDir": str(tmp_path / "state"), "stateKekFile": str(tmp_path / "keks" / "${NODE_NAME}")}
    config = parse_agent_config(state, environ={"NODE_NAME": "node-2"})
    assert config.join_token == "" and config.state_kek_file == tmp_path / "keks" / "node-2"
    with pytest.raises(UsageError, match="NODE_NAME"):
        parse_agent_config(state, environ={})
    (tmp_path / "state").mkdir(mode=0o755)
    os.chmod(tmp_path / "state", 0o755)
    assert config.state_dir is not None and config.state_kek_file is not None
    AgentState(config.state_dir, config.state_kek_file, TRUST_DOMAIN)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_a_saved_svid_the_server_refuses_falls_back_to_the_join_token(tmp_path: Path) -> None:
    """Saved under one trust-domain CA, then pointed at a server with another CA: the handshake refuses the
    saved SVID, and the agent joins with its (fresh) token instead."""
    state = tmp_path / "state"
    first = start_server(tmp_path / "first")
    try:
        start_agent(first, tmp_path, state_dir=state).stop()
    finally:
        first.shutdown()
    second = start_server(tmp_path / "second")
    try:
        node = start_agent(second, tmp_path, state_dir=state)
        try:
            assert node.agent.cache.server_reachable
            certificate = node.agent.client.certificate
            assert certificate is not None
            assert certificate.issuer == second.manager.active().ca_certificate.subject
        finally:
            node.stop()
    finally:
        second.shutdown()
