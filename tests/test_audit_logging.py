"""The server's audit lines (one per SVID) go to the `keyseal.audit` logger at the level the operator chose; with
an audit file they stay off the console, which shows a periodic count instead. The end-to-end case runs the real
`keyseal server` process and reads its stderr."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.server import CaServer
from tests.harness.ca import TOKENS, Client, base_config

KEYSEAL = str(Path(sys.executable).with_name("keyseal"))
SPIFFE_ID = "spiffe://example.org/ns/a/web"


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    """A console handler on the root logger at INFO, as `keyseal server` has (keyseal._internal.cli.service)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous)


def serve(tmp: Path, **overrides: Any) -> CaServer:
    server = CaServer(parse_config(base_config(tmp, **overrides)), rotation_thread=False)
    server.start()
    server.start_background()
    return server


def issue(server: CaServer, count: int) -> None:
    client = Client(server.port, None, TOKENS["ns-a"])
    try:
        for _ in range(count):
            status, body = client.x509_svid(SPIFFE_ID)
            assert status == 200, body
    finally:
        client.close()


def audit_lines(text: str) -> list[str]:
    """The audit lines of SVIDs issued to SPIFFE_ID (the server's own serving certificate is audited too)."""
    return [line for line in text.splitlines() if line.startswith("audit {") and SPIFFE_ID in line]


def test_without_an_audit_file_the_console_has_every_line(tmp_path: Path, console: io.StringIO,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", "off")
    server = serve(tmp_path)
    try:
        issue(server, 3)
    finally:
        server.shutdown()
    assert len(audit_lines(console.getvalue())) == 3  # the console is the only record: nothing is hidden


@pytest.mark.slow
def test_with_an_audit_file_the_console_has_a_summary(tmp_path: Path, console: io.StringIO,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(tmp_path / "audit.log"))
    sink: list[logging.LogRecord] = []
    structured = logging.Handler()
    structured.emit = sink.append  # type: ignore[method-assign]
    logging.getLogger("keyseal.audit").addHandler(structured)
    server = serve(tmp_path)
    try:
        issue(server, 4)
        assert server.audit_console.summarize() == (4, 0)
    finally:
        server.shutdown()
        logging.getLogger("keyseal.audit").removeHandler(structured)
    text = console.getvalue()
    assert audit_lines(text) == []
    assert "audit: 4 signatures in the last 1m (4 ok, 0 failed)" in text
    assert len(audit_lines((tmp_path / "audit.log").read_text().replace("{", "audit {"))) == 4
    # A handler of the keyseal.audit logger itself (a structured sink) still gets every line.
    assert len([r for r in sink if SPIFFE_ID in r.getMessage()]) == 4


@pytest.mark.slow
def test_the_operator_chooses_the_level(tmp_path: Path, console: io.StringIO,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", "off")
    server = serve(tmp_path, audit={"level": "debug"})
    try:
        issue(server, 2)
    finally:
        server.shutdown()
    assert audit_lines(console.getvalue()) == []  # debug lines, an info console
    logging.getLogger().setLevel(logging.WARNING)
    server = serve(tmp_path, audit={"level": "warning", "console": "lines"})
    try:
        issue(server, 2)
    finally:
        server.shutdown()
    assert len(audit_lines(console.getvalue())) == 2  # warning lines reach a warning console


def test_audit_config_errors() -> None:
    with pytest.raises(Exception, match=r"audit\.console='loud' is not one of auto, lines, summary, off"):
        parse_config({"trustDomain": "example.org", "audit": {"console": "loud"}})
    with pytest.raises(Exception, match=r"unknown configuration key 'audit\.levle'"):
        parse_config({"trustDomain": "example.org", "audit": {"levle": "info"}})


@pytest.mark.slow
def test_server_process_prints_a_summary_not_lines(tmp_path: Path) -> None:
    config = base_config(tmp_path, audit={"summaryInterval": "1s"})
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(config))
    env = {"PATH": "/usr/bin:/bin", "KEYSEAL_AUDIT_LOG": str(tmp_path / "audit.log"),
           "KEYSEAL_HOME": str(tmp_path / "home")}
    process = subprocess.Popen([KEYSEAL, "server", "--config", str(tmp_path / "server.yaml")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        port = None
        deadline = time.monotonic() + 60
        while port is None:
            assert time.monotonic() < deadline and process.poll() is None
            line = process.stderr.readline()
            if "serving trust domain" in line:
                port = int(line.split("https://127.0.0.1:", 1)[1].split()[0])
        client = Client(port, None, TOKENS["ns-a"])
        try:
            for _ in range(3):
                assert client.x509_svid(SPIFFE_ID)[0] == 200
        finally:
            client.close()
        seen = []
        while not any("audit: 3 signatures" in line for line in seen):
            assert time.monotonic() < deadline and process.poll() is None, seen
            seen.append(process.stderr.readline())
    finally:
        process.terminate()
        rest = process.communicate(timeout=30)[1]
    assert audit_lines("".join(seen) + rest) == []
    assert len(audit_lines((tmp_path / "audit.log").read_text().replace("{", "audit {"))) == 3
