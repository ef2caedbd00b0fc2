"""The Vault / OpenBao client for every keyseal component that talks to Transit (signing, key wrapping): one
place builds it (address, token source, namespace, CA bundle, timeouts, bounded retries) and renews its token.
Key references are `uri`, error translation `errors`, the least-privilege policy `policy`.

Settings, explicit values first, then the environment (VAULT_* first, then OpenBao's BAO_*):
- address: `VAULT_ADDR` / `BAO_ADDR`.
- token, the first source that is set: `VAULT_TOKEN` / `BAO_TOKEN`; a token file `KEYSEAL_VAULT_TOKEN_FILE`
  (e.g. a Vault Agent sink); Kubernetes auth with `KEYSEAL_VAULT_K8S_ROLE` (the service-account token from
  `KEYSEAL_VAULT_K8S_TOKEN_FILE`, by default the pod's, logging in at `auth/$KEYSEAL_VAULT_K8S_MOUNT`, by
  default `kubernetes`); else the CLI's own `~/.vault-token`.
- namespace: `VAULT_NAMESPACE` / `BAO_NAMESPACE`; CA bundle: `VAULT_CACERT` / `BAO_CACERT`. TLS is always
  verified (VAULT_SKIP_VERIFY is not honoured).
- `KEYSEAL_VAULT_CONNECT_TIMEOUT`, `KEYSEAL_VAULT_READ_TIMEOUT` (seconds), `KEYSEAL_VAULT_MAX_ATTEMPTS`.

hvac and requests are imported only inside functions, so importing this module works without the `vault` extra.
Tokens never appear in messages or logs.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from keyseal._internal.envsettings import env_number
from keyseal._internal.providers.vault.errors import error_detail, translate_vault_error, vault_errors
from keyseal.errors import AccessDeniedError, UsageError

if TYPE_CHECKING:
    import hvac

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["VaultConnection", "VaultSettings", "vault_client"]

DEFAULT_K8S_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 20.0
DEFAULT_MAX_ATTEMPTS = 3

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,255}")


@dataclass(frozen=True)
class VaultSettings:
    """Where Vault is and how to authenticate. Unset fields are filled from the environment by `resolved()`.

    At most one token source should be given: `token`, `token_file`, or `kubernetes_role` (+ its mount and
    service-account token file). When none is given, the environment's is used (see the module docstring).
    """

    address: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    kubernetes_role: str | None = None
    kubernetes_mount: str | None = None
    kubernetes_token_file: Path | None = None
    namespace: str | None = None
    ca_bundle: Path | None = None
    connect_timeout: float | None = None
    read_timeout: float | None = None
    max_attempts: int | None = None

    def has_token_source(self) -> bool:
        return bool(self.token or self.token_file or self.kubernetes_role)

    def resolved(self) -> VaultSettings:
        """These settings with every unset field taken from the environment (or its default)."""
        env = os.environ
        settings = replace(
            self,
            address=self.address or _env("VAULT_ADDR", "BAO_ADDR"),
            namespace=self.namespace or _env("VAULT_NAMESPACE", "BAO_NAMESPACE"),
            ca_bundle=self.ca_bundle or _path(_env("VAULT_CACERT", "BAO_CACERT")),
            kubernetes_mount=self.kubernetes_mount or env.get("KEYSEAL_VAULT_K8S_MOUNT") or "kubernetes",
            kubernetes_token_file=(
                self.kubernetes_token_file or _path(env.get("KEYSEAL_VAULT_K8S_TOKEN_FILE"))
                or DEFAULT_K8S_TOKEN_FILE
            ),
            connect_timeout=self.connect_timeout or env_number(
                "KEYSEAL_VAULT_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT, integer=False, minimum=0.01),
            read_timeout=self.read_timeout or env_number(
                "KEYSEAL_VAULT_READ_TIMEOUT", DEFAULT_READ_TIMEOUT, integer=False, minimum=0.01),
            max_attempts=self.max_attempts or int(env_number(
                "KEYSEAL_VAULT_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, integer=True, minimum=1)),
        )
        if not settings.has_token_source():
            token = _env("VAULT_TOKEN", "BAO_TOKEN")
            token_file = _path(env.get("KEYSEAL_VAULT_TOKEN_FILE"))
            role = env.get("KEYSEAL_VAULT_K8S_ROLE") or None
            if token:
                settings = replace(settings, token=token)
            elif token_file:
                settings = replace(settings, token_file=token_file)
            elif role:
                settings = replace(settings, kubernetes_role=role)
            else:
                settings = replace(settings, token_file=Path("~/.vault-token").expanduser())
        return settings

    def describe_token_source(self) -> str:
        if self.token:
            return "the configured token (VAULT_TOKEN / BAO_TOKEN)"
        if self.kubernetes_role:
            return f"Kubernetes auth (role {self.kubernetes_role} at auth/{self.kubernetes_mount})"
        return f"the token file {self.token_file}"


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _read_secret_file(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        raise AccessDeniedError(f"{what} {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise AccessDeniedError(f"cannot read {what} {path}: {reason}") from exc
    if not text:
        raise AccessDeniedError(f"{what} {path} is empty")
    return text


def _check_address(address: str | None) -> str:
    if not address:
        raise UsageError(
            "no Vault address is configured: set VAULT_ADDR (or BAO_ADDR), e.g. https://vault.example.org:8200"
        )
    parsed = urllib.parse.urlsplit(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        raise UsageError(f"invalid Vault address {address!r}: use http(s)://HOST[:PORT]")
    return address.rstrip("/")


class _QuietRetries(logging.Filter):
    """urllib3 warns on every retry; keyseal's one-line error (or success) is what the user should see."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Retrying")


_QUIET_RETRIES = _QuietRetries()


def vault_client(settings: VaultSettings | None = None) -> hvac.Client:
    """An authenticated hvac client. Kubernetes auth logs in here (one `auth/<mount>/login` call)."""
    try:  # the optional SDK is imported only when a Vault client is really needed
        import hvac
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry
    except ImportError as exc:
        raise UsageError("Vault / OpenBao support needs hvac: pip install 'keyseal[vault]'") from exc
    s = (settings or VaultSettings()).resolved()
    address = _check_address(s.address)
    if s.namespace is not None and not _NAMESPACE_RE.fullmatch(s.namespace):
        raise UsageError(f"invalid Vault namespace {s.namespace!r}: use letters, digits, '.', '_', '-' and '/'")
    verify: bool | str = True
    if s.ca_bundle is not None:
        if not s.ca_bundle.is_file():
            raise UsageError(f"the Vault CA bundle {s.ca_bundle} (VAULT_CACERT / BAO_CACERT) is not a readable file")
        verify = str(s.ca_bundle)
    attempts = int(s.max_attempts or DEFAULT_MAX_ATTEMPTS)
    retry = Retry(
        total=attempts - 1, connect=attempts - 1, read=0, redirect=0, other=0,
        status=attempts - 1, status_forcelist=(429, 502, 503, 504), allowed_methods=None,
        backoff_factor=0.25, raise_on_status=False, respect_retry_after_header=True,
    )
    logging.getLogger("urllib3.connectionpool").addFilter(_QUIET_RETRIES)  # idempotent: a set of filters
    session = requests.Session()
    session.verify = verify  # hvac takes a given session's verify over its own argument
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    client = hvac.Client(
        url=address, token="", verify=verify, namespace=s.namespace, session=session,  # "": no env fallback
        timeout=(s.connect_timeout, s.read_timeout),  # type: ignore[arg-type]  # requests takes (connect, read)
    )
    if s.token:
        client.token = _usable_token(s.token, s.describe_token_source())
    elif s.kubernetes_role:
        _kubernetes_login(client, s, address)
    else:
        assert s.token_file is not None
        where = "token file" if s.token_file != Path("~/.vault-token").expanduser() else "Vault CLI token file"
        if not s.token_file.exists() and where == "Vault CLI token file":
            raise AccessDeniedError(
                "no Vault token is configured: set VAULT_TOKEN (or BAO_TOKEN), KEYSEAL_VAULT_TOKEN_FILE, or "
                "KEYSEAL_VAULT_K8S_ROLE for Kubernetes auth, or log in with the vault / bao CLI"
            )
        token = _read_secret_file(s.token_file, f"Vault {where}")
        client.token = _usable_token(token, f"the Vault {where} {s.token_file}")
    return client


def _usable_token(token: str, source: str) -> str:
    """The token, if an HTTP header can carry it (visible ASCII): the HTTP library's refusal of one that cannot
    quotes the header, token and all, and keyseal's errors keep their cause."""
    if not all("!" <= char <= "~" for char in token):
        raise AccessDeniedError(
            f"{source} does not hold one Vault token: it has spaces, line breaks or non-ASCII characters inside "
            f"(a token file holds the token alone)"
        )
    return token


def _kubernetes_login(client: hvac.Client, s: VaultSettings, address: str) -> None:
    assert s.kubernetes_role is not None and s.kubernetes_token_file is not None
    jwt = _read_secret_file(s.kubernetes_token_file, "Kubernetes service-account token")
    mount = s.kubernetes_mount or "kubernetes"
    auth: Any = client.auth.kubernetes
    try:
        auth.login(role=s.kubernetes_role, jwt=jwt, mount_point=mount)
    except Exception as exc:
        error = translate_vault_error(exc, address, "update", f"auth/{mount}/login",
                                      f"Kubernetes login (role {s.kubernetes_role})", probe=None)
        if isinstance(error, AccessDeniedError):
            error = AccessDeniedError(
                f"Vault at {address} refused Kubernetes login with role {s.kubernetes_role} at auth/{mount} "
                f"({error_detail(exc)}): check that the role exists and is bound to this service account and namespace"
            )
        raise error from exc


class VaultConnection:
    """One lazily built client, shared by a signer or a KEK provider for its lifetime.

    When Vault refuses the token and its source can give a new one (a Kubernetes login, or a token file that a
    Vault Agent rewrites), the client is rebuilt once and the call retried: a long-running server outlives
    its token's TTL. A plain token is never retried.
    """

    def __init__(self, settings: VaultSettings | None = None) -> None:
        self.settings = (settings or VaultSettings()).resolved()
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def renewable(self) -> bool:
        return not self.settings.token and bool(self.settings.kubernetes_role or self.settings.token_file)

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = vault_client(self.settings)
            return self._client

    def call(self, capability: str, path: str, subject: str, fn: Callable[[Any], T]) -> T:
        """`fn(client)`, with errors translated (see `vault_errors`) and one renewal on a refused token."""
        client = self.client()
        try:
            with vault_errors(client, capability, path, subject):
                return fn(client)
        except AccessDeniedError:
            if not self.renewable:
                raise
        log.info("Vault refused the token for %s: authenticating again with %s", subject,
                 self.settings.describe_token_source())
        with self._lock:
            if self._client is client:
                self._client = None
                client.adapter.close()
        client = self.client()
        with vault_errors(client, capability, path, subject):
            return fn(client)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.adapter.close()
