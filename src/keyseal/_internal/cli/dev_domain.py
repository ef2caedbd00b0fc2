"""`keyseal dev`: a whole trust domain on one machine, for trying keyseal out and for local development.

It writes a server and an agent configuration into one directory and loads them with the same parsers as
`keyseal server` and `keyseal agent`, so what it runs is what those commands would run from the files it leaves.
Everything it starts is local and private by construction: the server listens on 127.0.0.1 only (any free port),
its CA keys are wrapped by a local KEK file in that directory, the store is that directory, the Workload API
socket is there too with mode 0600 (this user only). The server and the agent run in this process, as threads,
so nothing is left running once it returns.

This is not a production deployment: the KEK lies beside the keys it wraps (anyone who can read the directory can
use the CA), which is why the directory is made 0700 and, unless `--dir` names one, removed at the end.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyseal._internal.atomic import write_atomic
from keyseal.errors import BackendUnavailableError, UsageError

if TYPE_CHECKING:
    from keyseal._internal.agent.main import Agent
    from keyseal._internal.ca.config import Config
    from keyseal._internal.ca.server import CaServer

__all__ = ["DEFAULT_TRUST_DOMAIN", "DevDomain", "DevReport", "run_dev"]

log = logging.getLogger(__name__)

DEFAULT_TRUST_DOMAIN = "example.org"
AUDIENCE = "keyseal-dev"
AGENT_NAME = "dev"
FETCH_TIMEOUT = 20.0
_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclass(frozen=True)
class DevReport:
    """What a newcomer needs to use the trust domain, in the order it is printed."""

    trust_domain: str
    directory: Path
    kept: bool
    server_url: str
    bundle_sha256: str
    socket: Path
    spiffe_id: str
    x509_expires: datetime
    jwt_expires: datetime

    def fields(self) -> list[tuple[str, str]]:
        when = "kept" if self.kept else "removed on exit"
        return [
            ("trust domain", self.trust_domain),
            ("server", f"{self.server_url} (127.0.0.1 only)"),
            ("CA sha256", self.bundle_sha256),
            ("directory", f"{self.directory} ({when})"),
            ("server config", str(self.directory / "server.yaml")),
            ("agent config", str(self.directory / "agent.yaml")),
            ("agent socket", f"unix:{self.socket}"),
            ("SPIFFE ID", self.spiffe_id),
            ("X.509-SVID expires", _utc(self.x509_expires)),
            ("JWT-SVID expires", f"{_utc(self.jwt_expires)} (audience {AUDIENCE})"),
            ("workloads use", f"export SPIFFE_ENDPOINT_SOCKET=unix:{self.socket}"),
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "trustDomain": self.trust_domain, "serverURL": self.server_url, "bundleSHA256": self.bundle_sha256,
            "directory": str(self.directory), "kept": self.kept, "socket": f"unix:{self.socket}",
            "spiffeID": self.spiffe_id, "x509SVIDExpires": _utc(self.x509_expires),
            "jwtSVIDExpires": _utc(self.jwt_expires), "jwtAudience": AUDIENCE,
        }


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _user_name() -> str:
    """The current user's name as a SPIFFE ID path segment (letters, digits, '.', '-', '_')."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = ""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in ".-_") else "-" for c in name).strip(".")
    return safe or f"uid-{os.getuid()}"


class DevDomain:
    """The server and agent of `keyseal dev`, started in this process; `stop()` ends both and cleans up."""

    def __init__(self, directory: Path | None, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        missing = [name for name in ("yaml", "grpc", "spiffe") if not _installed(name)]
        if missing:
            raise UsageError(f"keyseal dev runs the server and the agent, which need {', '.join(missing)}: "
                             f"pip install 'keyseal[server,agent]'")
        self.kept = directory is not None
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="keyseal-dev-"))
        else:
            directory = directory.absolute()
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"--dir {directory}: cannot create it: {exc.strerror or exc}") from exc
            if not directory.is_dir():
                raise UsageError(f"--dir {directory} is not a directory")
        directory.chmod(0o700)  # the local KEK lives here: this user only
        self.directory = directory
        self.trust_domain = trust_domain
        self.socket = directory / "agent.sock"
        if len(os.fsencode(self.socket)) > _SOCKET_PATH_MAX:
            self._remove()
            raise UsageError(f"--dir {directory} is too long for a Unix socket path (at most "
                             f"{_SOCKET_PATH_MAX - len('/agent.sock')} bytes): choose a shorter directory")
        self.server: CaServer | None = None
        self.agent: Agent | None = None

    def _write(self, name: str, document: dict[str, Any], mode: int = 0o600) -> Path:
        import yaml

        path = self.directory / name
        header = f"# written by keyseal dev --dir {self.directory}, which reads it again at its next run\n"
        write_atomic(path, (header + yaml.safe_dump(document, sort_keys=False)).encode(), mode=mode)
        return path

    def server_document(self) -> dict[str, Any]:
        return {
            "trustDomain": self.trust_domain,
            "keyWrapping": {"provider": "local", "local": {"kekFile": str(self.directory / "kek")}},
            "store": {"type": "directory", "directory": {"path": str(self.directory / "store"),
                                                          "ledgerFile": str(self.directory / "seen-versions.json")}},
            "server": {"listen": "127.0.0.1:0"},
            "logLevel": "info",
        }

    def start(self) -> DevReport:
        """Server, bundle, join token, entry, agent, then one X.509-SVID and one JWT-SVID fetched with py-spiffe
        the way a workload would."""
        from keyseal._internal.agent.config import load_agent_config
        from keyseal._internal.agent.main import Agent
        from keyseal._internal.ca.config import load_config
        from keyseal._internal.ca.registry.stores import entry_store_for
        from keyseal._internal.ca.server import CaServer
        from keyseal._internal.spiffe.bootstrap import fetch_bundle

        config = load_config(self._write("server.yaml", self.server_document()))
        (self.directory / "store").mkdir(mode=0o700, exist_ok=True)
        self.server = CaServer(config)
        self.server.start()
        self.server.start_background()
        server_url = f"https://127.0.0.1:{self.server.port}"
        fingerprint = self.server.bundle_fingerprint()
        # The way an agent on another machine bootstraps: fetch the bundle, keep it only if the pin matches.
        bundle = fetch_bundle(server_url, fingerprint)
        write_atomic(self.directory / "bundle.pem", bundle.pem().encode("ascii"), mode=0o644)

        agent_id = self._join_token(config)
        spiffe_id = f"spiffe://{self.trust_domain}/user/{_user_name()}"
        selector = f"unix:uid:{os.getuid()}"
        entries = entry_store_for(config)
        if not any(e.spiffe_id == spiffe_id and e.parent_id == agent_id and e.selectors == (selector,)
                   for e in entries.entries()):
            entries.create(spiffe_id, agent_id, (selector,))

        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by an earlier run in the same --dir that was killed
        agent_config = load_agent_config(self._write("agent.yaml", {
            "trustDomain": self.trust_domain, "serverURL": server_url,
            "trustBundleFile": str(self.directory / "bundle.pem"),
            "joinTokenFile": str(self.directory / "join-token"), "stateDir": str(self.directory / "agent-state"),
            "socketPath": str(self.socket), "socketMode": "0600", "syncInterval": "5s", "logLevel": "info",
        }))
        self.agent = Agent(agent_config)
        self.agent.start()
        x509_expires, jwt_expires, fetched_id = fetch_with_py_spiffe(self.socket)
        if fetched_id != spiffe_id:
            raise BackendUnavailableError(f"the agent served {fetched_id}, not {spiffe_id}")
        return DevReport(self.trust_domain, self.directory, self.kept, server_url, fingerprint, self.socket,
                         spiffe_id, x509_expires, jwt_expires)

    def _join_token(self, config: Config) -> str:
        """A join token in DIR/join-token, unless the agent saved an SVID (in DIR/agent-state) that the server
        still takes: a second `keyseal dev --dir` resumes it. Returns the agent's SPIFFE ID."""
        from keyseal._internal.ca.registry.stores import agent_registry_for, join_tokens_for

        tokens = join_tokens_for(config)
        agent_id = f"spiffe://{self.trust_domain}/keyseal/agent/{AGENT_NAME}"
        state = self.directory / "agent-state"
        expires = agent_registry_for(config).svid_expiry(agent_id)
        token_file = self.directory / "join-token"
        if state.is_dir() and any(state.iterdir()) and expires is not None \
                and expires > datetime.now(UTC) + timedelta(minutes=5):
            with contextlib.suppress(FileNotFoundError):
                token_file.unlink()
            return agent_id
        token, agent_id = tokens.issue(AGENT_NAME, timedelta(minutes=10), replace=True)
        write_atomic(token_file, token.encode("ascii") + b"\n", mode=0o600)
        return agent_id

    def stop(self) -> None:
        """Stop the agent, then the server; remove the directory unless `--dir` named it."""
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        if not self.kept:
            self._remove()

    def _remove(self) -> None:
        if not self.kept:
            shutil.rmtree(self.directory, ignore_errors=True)


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: present in sys.modules without a spec (e.g. set to None)
        return False


def fetch_with_py_spiffe(socket: Path) -> tuple[datetime, datetime, str]:
    """One X.509-SVID and one JWT-SVID through the Workload API, with the PyPI `spiffe` client (an independent
    implementation, as a workload would use): their expiries and the SPIFFE ID."""
    from cryptography.utils import CryptographyDeprecationWarning

    with warnings.catch_warnings():  # see agent.pyspiffe: a dependency's import-time warning
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"spiffe(\.|$)")
        from spiffe import WorkloadApiClient

    deadline = time.monotonic() + FETCH_TIMEOUT
    while True:
        try:
            with WorkloadApiClient(f"unix:{socket}", default_timeout=5) as client:
                svid = client.fetch_x509_svid()
                jwt = client.fetch_jwt_svid({AUDIENCE})
            break
        except Exception as exc:  # py-spiffe raises its own errors and gRPC's
            if time.monotonic() > deadline:
                raise BackendUnavailableError(f"py-spiffe could not fetch an SVID from unix:{socket}: "
                                              f"{type(exc).__name__}: {str(exc)[:200]}") from exc
            time.sleep(0.2)
    return (svid.leaf.not_valid_after_utc, datetime.fromtimestamp(jwt.expiry, tz=UTC), str(svid.spiffe_id))


@contextlib.contextmanager
def dev_logging(directory: Path, verbose: bool) -> Iterator[Path]:
    """The server's and agent's log lines (audit lines included) go to DIR/dev.log; the console keeps warnings
    (everything with -v)."""
    from keyseal._internal.cli.service import configure_logging

    path = directory / "dev.log"
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    previous_level = root.level
    configure_logging("info")
    console_levels = [(h, h.level) for h in root.handlers]
    for console, _ in console_levels:
        console.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(previous_level)
        for console, level in console_levels:
            console.setLevel(level)


def run_dev(directory: Path | None, trust_domain: str, check: bool, stop: threading.Event,
            show: Any, verbose: bool = False) -> DevReport:
    """Start the domain, hand its report to `show`, then (unless `check`) wait for `stop`; always clean up."""
    domain = DevDomain(directory, trust_domain)
    try:
        with dev_logging(domain.directory, verbose):
            report = domain.start()
            show(report)
            if not check:
                stop.wait()
            domain.stop()
    finally:
        domain.stop()
    return report
