"""`keyseal server --config FILE` as a user runs it (a child process): the KMS log line, clean shutdown, and
startup failures that exit non-zero with one clear error line and write nothing."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.conftest import REGION, Result, run_keyseal
from tests.harness.ca import Client, base_config
from tests.harness.kms_emulator import KmsEmulator
from tests.harness.openbao import OpenBao

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


def kek(kms_emulator: KmsEmulator) -> str:
    client = boto3.client("kms", region_name=REGION, endpoint_url=kms_emulator.endpoint,
                          aws_access_key_id="admin", aws_secret_access_key="admin")
    return str(client.create_key(KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]["Arn"])


def write_config(tmp: Path, data: dict[str, Any]) -> Path:
    path = tmp / "keyseal.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_fails_cleanly(result: Result, needle: str) -> None:
    """Non-zero exit; the last line is the one error line (info lines may precede it); no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]], result.stderr
    assert lines[-1].startswith("keyseal: error: "), lines[-1]
    assert needle in lines[-1], lines[-1]


def nothing_written(tmp: Path) -> bool:
    store = tmp / "store"
    return not store.exists() or not any(store.iterdir())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "keyseal", "server", "--config", str(config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r}; saw: {self.seen}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def test_awskms_server_logs_its_kek_and_serves(tmp_path: Path, kms_emulator: KmsEmulator,
                                               aws_env: dict[str, str]) -> None:
    arn = kek(kms_emulator)
    config = write_config(tmp_path, base_config(tmp_path, keyWrapping={"provider": "awskms"},
                                                aws={"kmsKeyARN": arn}))
    server = ServerProcess(config)
    try:
        server.wait_for(r"^\S+Z INFO Key wrapping via KMS keyARN=" + re.escape(arn) + "$")
        port = int(server.wait_for(r"serving trust domain example.org on https://127.0.0.1:(\d+)").group(1))
        client = Client(port, None)
        assert client.request("GET", "/healthz")[0] == 200
        assert client.request("GET", "/readyz")[0] == 200
        client.close()
    finally:
        code = server.stop()
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [  # the records, and the bundle sequences
        "keyseal-example.org-bundle-sequence.json", "keyseal-example.org-jwt-0", "keyseal-example.org-x509-0",
        "keyseal-seen-versions"]


def test_kms_unreachable_exits_with_one_line_and_writes_nothing(tmp_path: Path, aws_env: dict[str, str]) -> None:
    arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    config = write_config(tmp_path, base_config(tmp_path, keyWrapping={"provider": "awskms"},
                                                aws={"kmsKeyARN": arn,
                                                     "endpoints": {"kms": f"http://127.0.0.1:{closed_port()}"}}))
    result = run_keyseal("server", "--config", config, env={"KEYSEAL_KMS_MAX_ATTEMPTS": "1"})
    assert_fails_cleanly(result, "cannot reach AWS KMS at http://127.0.0.1:")
    assert arn in result.stderr.splitlines()[-1]
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("operation", ["Encrypt", "Decrypt", "*"])
def test_kms_access_denied_exits_with_one_line_and_writes_nothing(
        operation: str, tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str]) -> None:
    arn = kek(kms_emulator)
    kms_emulator.deny("role-without-kms", operation)
    config = write_config(tmp_path, base_config(tmp_path, keyWrapping={"provider": "awskms"},
                                                aws={"kmsKeyARN": arn}))
    result = run_keyseal("server", "--config", config, env={"AWS_ACCESS_KEY_ID": "role-without-kms"})
    needle = "AWS KMS denied kms:" + ("Encrypt" if operation == "*" else operation)
    assert_fails_cleanly(result, needle)
    assert nothing_written(tmp_path)


def test_denied_encrypt_is_found_at_restart_too(tmp_path: Path, kms_emulator: KmsEmulator,
                                                aws_env: dict[str, str]) -> None:
    """With records already there, Decrypt is proven by opening them; kms:Encrypt (needed at the next
    rotation) is still checked at startup, and nothing is rewritten."""
    arn = kek(kms_emulator)
    config = write_config(tmp_path, base_config(tmp_path, keyWrapping={"provider": "awskms"},
                                                aws={"kmsKeyARN": arn}))
    from keyseal._internal.ca.config import load_config
    from keyseal._internal.ca.server import CaServer

    first = CaServer(load_config(config))
    first.start()
    first.shutdown()
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    kms_emulator.deny("no-encrypt", "Encrypt")
    result = run_keyseal("server", "--config", config, env={"AWS_ACCESS_KEY_ID": "no-encrypt"})
    assert_fails_cleanly(result, "AWS KMS denied kms:Encrypt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()} == before


def test_switching_kek_provider_is_refused(tmp_path: Path, kms_emulator: KmsEmulator,
                                           aws_env: dict[str, str]) -> None:
    local = write_config(tmp_path, base_config(tmp_path))
    from keyseal._internal.ca.config import load_config
    from keyseal._internal.ca.server import CaServer

    first = CaServer(load_config(local))
    first.start()
    first.shutdown()
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    kms_emulator.calls.clear()
    switched = write_config(tmp_path, base_config(tmp_path, keyWrapping={"provider": "awskms"},
                                                  aws={"kmsKeyARN": kek(kms_emulator)}))
    kms_emulator.calls.clear()
    result = run_keyseal("server", "--config", switched)
    assert_fails_cleanly(result, "switching KEK providers on existing records is not supported")
    assert {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()} == before
    assert kms_emulator.calls.counts()["Decrypt"] == 0  # refused before any unwrap


@pytest.mark.parametrize(
    ("change", "needle"),
    [({"aws": {"kmsKeyArn": "x"}}, "unknown configuration key 'aws.kmsKeyArn'"),
     ({"keyWrapping": {"provider": "awskms"}}, "aws.kmsKeyARN is required"),
     ({"keyWrapping": {"provider": "vault"}}, "vault.transitKey is required"),
     ({"keyWrapping": {"provider": "vault"}, "vault": {"transitKey": "kek"}}, "vault.address is required"),
     ({"vault": {"address": "http://127.0.0.1:1", "transitKey": "kek"}}, "configure exactly one KEK provider"),
     ({"keyWrapping": {"provider": "vault"}, "vault": {"address": "http://127.0.0.1:1", "transitKey": "kek"},
       "aws": {"kmsKeyARN": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"}},
      "configure exactly one KEK provider")],
)
def test_bad_config_is_one_line(tmp_path: Path, change: dict[str, Any], needle: str) -> None:
    config = write_config(tmp_path, base_config(tmp_path, **change))
    result = run_keyseal("server", "--config", config)
    assert_fails_cleanly(result, needle)
    assert str(config) in result.stderr
    assert nothing_written(tmp_path)


def test_key_manager_custody_unreachable_or_denied(tmp_path: Path, kms_emulator: KmsEmulator,
                                                   aws_env: dict[str, str]) -> None:
    unreachable = write_config(tmp_path, base_config(tmp_path, custody="kms",
                                                     aws={"endpoints": {"kms": f"http://127.0.0.1:{closed_port()}"}}))
    result = run_keyseal("server", "--config", unreachable, env={"KEYSEAL_KMS_MAX_ATTEMPTS": "1"})
    assert_fails_cleanly(result, "cannot reach AWS KMS")
    kms_emulator.deny("no-create", "CreateKey")
    denied = write_config(tmp_path, base_config(tmp_path, custody="kms",
                                                aws={"keyManager": {"aliasPrefix": "denied/test"}}))
    kms_emulator.calls.clear()
    result = run_keyseal("server", "--config", denied, env={"AWS_ACCESS_KEY_ID": "no-create"})
    assert_fails_cleanly(result, "AWS KMS denied kms:CreateKey")
    assert kms_emulator.calls.counts()["CreateAlias"] == 0


def test_vault_transit_kek_server_logs_and_restarts(tmp_path: Path, openbao: OpenBao,
                                                    vault_env: dict[str, str]) -> None:
    """keyWrapping.provider vault: the CA keys are wrapped by a Transit key named in the config; a restart opens
    the same records, and a different Transit key is refused as a KEK switch."""
    openbao.create_key("server-kek", "aes256-gcm96")
    vault_section = {"address": openbao.address, "transitKey": "server-kek"}
    config = write_config(tmp_path, base_config(tmp_path, keyWrapping={"provider": "vault"}, vault=vault_section))
    for _ in range(2):  # create, then reopen
        server = ServerProcess(config)
        try:
            server.wait_for(r"INFO Key wrapping via Vault Transit key=transit/server-kek address="
                            + re.escape(openbao.address) + "$")
            port = int(server.wait_for(r"serving trust domain example.org on https://127.0.0.1:(\d+)").group(1))
            client = Client(port, None)
            assert client.request("GET", "/readyz")[0] == 200
            client.close()
        finally:
            assert server.stop() == 0
    records = sorted(p.name for p in (tmp_path / "store").iterdir() if not p.name.endswith("-sequence.json"))
    assert records == ["keyseal-example.org-jwt-0", "keyseal-example.org-x509-0", "keyseal-seen-versions"]
    assert all(b"vault" in (tmp_path / "store" / name).read_bytes() for name in records)

    openbao.create_key("other-kek", "aes256-gcm96")
    other = write_config(tmp_path, base_config(tmp_path, keyWrapping={"provider": "vault"},
                                               vault={**vault_section, "transitKey": "other-kek"}))
    assert_fails_cleanly(run_keyseal("server", "--config", other), "other-kek")


def test_records_no_configured_kek_opens_refuse_startup(tmp_path: Path) -> None:
    """A KEK replaced under existing records (a GitOps sync that regenerated the KEK Secret) stops the server
    with a message that says the stored CA keys are unreadable with the configured KEK; nothing is written, in
    particular no new CA keys over the old ones."""
    config = write_config(tmp_path, base_config(tmp_path))
    from keyseal._internal.ca.config import load_config
    from keyseal._internal.ca.server import CaServer

    first = CaServer(load_config(config))
    first.start()
    first.shutdown()
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    (tmp_path / "kek").unlink()
    from keyseal._internal.wrapping.local import LocalKek

    LocalKek(tmp_path / "kek").prepare_write()  # another, freshly generated KEK at the same path
    result = run_keyseal("server", "--config", config)
    assert_fails_cleanly(result, "no configured KEK opens them")
    assert "refusing to start" in result.stderr and "keyseal-example.org-x509-0" in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()} == before
