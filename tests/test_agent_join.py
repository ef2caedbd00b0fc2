"""`POST /v1/agent/join` against a real server on 127.0.0.1 (directory store): a token nobody issued costs the
server a read of the token file, never a CSR signature check or a write; a redeemed token is written once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from keyseal._internal.ca.issuance.x509svid import _verified_csr_key
from keyseal._internal.ca.registry.stores import join_tokens_for
from keyseal._internal.ca.server import CaServer
from tests.harness.agent import agent_call, start_server
from tests.harness.ca import make_csr


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CaServer]:
    instance = start_server(tmp_path)
    yield instance
    instance.shutdown()


def token_file(server: CaServer) -> Path:
    return server.config.store_path / f"{server.config.record_prefix}-join-tokens.json"


def stamp(path: Path) -> tuple[int, int, int]:
    """What changes when the file is written again (write_atomic: a new inode)."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def test_an_unknown_token_is_refused_before_the_csr_is_read(server: CaServer) -> None:
    """Before: the CSR was verified first, so a bogus token with a bad CSR got 400 and one with a good CSR cost
    a signature check."""
    status, answer = agent_call(server, None, "/v1/agent/join", {"token": "bogus", "csr": "not a CSR"})
    assert status == 401 and answer["error"] == "unauthenticated", answer
    csr = make_csr()
    verified = _verified_csr_key.cache_info().misses
    assert agent_call(server, None, "/v1/agent/join", {"token": "bogus", "csr": csr})[0] == 401
    assert _verified_csr_key.cache_info().misses == verified  # its signature was never checked


def test_an_unknown_token_writes_nothing(server: CaServer) -> None:
    """Before: every join rewrote (and fsynced) the token file, whatever the token; expired tokens were purged on
    the way. Now only a redeemed token writes."""
    tokens = join_tokens_for(server.config)
    tokens.issue("node-old", timedelta(seconds=1), server.clock() - timedelta(seconds=5))  # stored, expired
    valid, _ = tokens.issue("node-1", timedelta(minutes=5))
    before = stamp(token_file(server))
    for _ in range(3):
        assert agent_call(server, None, "/v1/agent/join", {"token": "bogus", "csr": make_csr()})[0] == 401
    assert stamp(token_file(server)) == before
    # A valid token with a bad CSR is refused (400) and not burnt: nothing was written either.
    assert agent_call(server, None, "/v1/agent/join", {"token": valid, "csr": "not a CSR"})[0] == 400
    assert stamp(token_file(server)) == before
    assert agent_call(server, None, "/v1/agent/join", {"token": valid, "csr": make_csr()})[0] == 200
    after = stamp(token_file(server))
    assert after != before  # redeemed: written, and the expired token purged with it
    assert '"tokens": {}' in token_file(server).read_text()
    assert agent_call(server, None, "/v1/agent/join", {"token": valid, "csr": make_csr()})[0] == 401
    assert stamp(token_file(server)) == after
