"""Shared Vault / OpenBao plumbing for every keyseal component that talks to Transit (signing, key wrapping).

One place parses Transit key references (`hashivault://<mount>/<key>[?version=N]`), one place builds the client
(address, token source, namespace, CA bundle, timeouts, bounded retries), and one place turns hvac / requests
errors into keyseal's typed errors with one clear line that names the missing policy capability. The
least-privilege policy for one key lives here too (pure data).

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from keyseal._internal.envsettings import env_number
from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    KeyNotFoundError,
    KeysealError,
    KeyURIError,
    UnsupportedKeyError,
    UsageError,
    one_line,
)

if TYPE_CHECKING:
    import hvac

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "DEFAULT_MOUNT",
    "SCHEME",
    "TransitKeyRef",
    "VaultConnection",
    "VaultSettings",
    "parse_transit_ref",
    "policy_hcl",
    "translate_vault_error",
    "vault_client",
    "vault_errors",
]

SCHEME = "hashivault"
DEFAULT_MOUNT = "transit"
DEFAULT_K8S_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 20.0
DEFAULT_MAX_ATTEMPTS = 3

# Transit key names and mount path segments: what keyseal accepts (a subset of what Vault accepts, so a path
# can never be bent by `..`, `?`, `#`, `*`, `+` or whitespace, and the policy paths it prints match exactly).
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,255}")


# -- key references ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransitKeyRef:
    """A Transit key: its mount (which may have several segments) and name, and a pinned version or None."""

    mount: str
    name: str
    version: int | None = None

    @property
    def uri(self) -> str:
        """The canonical URI, with the mount always spelled out."""
        suffix = f"?version={self.version}" if self.version is not None else ""
        return f"{SCHEME}://{self.mount}/{self.name}{suffix}"

    @property
    def key_uri(self) -> str:
        """The URI of the key itself, without a pinned version."""
        return f"{SCHEME}://{self.mount}/{self.name}"

    def path(self, endpoint: str) -> str:
        """The API path of one endpoint for this key, e.g. `transit/sign/NAME` (also the policy path)."""
        return f"{self.mount}/{endpoint}/{self.name}"


def parse_transit_ref(text: str) -> TransitKeyRef:
    """`hashivault://[MOUNT/]KEY[?version=N]` (MOUNT defaults to `transit` and may hold several segments).

    Also accepts the part after `hashivault:` (`//MOUNT/KEY`), as the backend registry hands it over.
    """
    rest = text[len(SCHEME) + 1:] if text.startswith(f"{SCHEME}:") else text
    hint = f"use {SCHEME}://MOUNT/KEY or {SCHEME}://KEY (mount transit), optionally ?version=N"
    if not rest.startswith("//"):
        raise KeyURIError(f"invalid Vault Transit key URI {text!r}: {hint}")
    path, sep, query = rest[2:].partition("?")
    segments = path.split("/")
    if not path or not all(_SEGMENT_RE.fullmatch(s) for s in segments):
        raise KeyURIError(
            f"invalid Vault Transit key URI {text!r}: mount and key names are letters, digits, '.', '_' and '-' "
            f"separated by '/'; {hint}"
        )
    name = segments[-1]
    mount = "/".join(segments[:-1]) or DEFAULT_MOUNT
    version: int | None = None
    if sep:
        try:
            params = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise KeyURIError(f"invalid query in Vault Transit key URI {text!r}: {hint}") from None
        unknown = set(params) - {"version"}
        if unknown:
            raise KeyURIError(
                f"unknown parameter {sorted(unknown)[0]!r} in Vault Transit key URI {text!r}: only version=N"
            )
        values = params.get("version", [])
        if len(values) != 1 or not re.fullmatch(r"[1-9][0-9]{0,8}", values[0]):
            raise KeyURIError(
                f"invalid version in Vault Transit key URI {text!r}: give one whole number from 1, e.g. ?version=2"
            )
        version = int(values[0])
    return TransitKeyRef(mount, name, version)


# -- settings and client ----------------------------------------------------------------------------------


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
    except FileNotFoundError:
        raise AccessDeniedError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise AccessDeniedError(f"cannot read {what} {path}: {reason}") from None
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
    except ImportError:
        raise UsageError("Vault / OpenBao support needs hvac: pip install 'keyseal[vault]'") from None
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
        client.token = s.token
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
        client.token = _read_secret_file(s.token_file, f"Vault {where}")
    return client


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
                f"({_detail(exc)}): check that the role exists and is bound to this service account and namespace"
            )
        raise error from None


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


# -- errors -----------------------------------------------------------------------------------------------


def _detail(exc: BaseException) -> str:
    """Vault's own error text: its `errors` list, without hvac's `, on post URL` tail or multi-error framing."""
    errors = getattr(exc, "errors", None)
    if isinstance(errors, str):
        errors = [errors]
    parts: list[str] = []
    for error in errors or ():
        text = str(error)
        bullets = re.findall(r"^\s*\*\s*(.+)$", text, flags=re.MULTILINE)
        parts.extend(bullets or [text])
    if not parts:
        message = str(exc).split(", on ")[0]
        parts = [message] if message and message != "None" else []
    return one_line("; ".join(parts)) or type(exc).__name__


def _token_accepted(client: Any) -> bool | None:
    """Whether the token is valid at all (`auth/token/lookup-self`, in Vault's default policy); None: unknown."""
    try:
        client.auth.token.lookup_self()
    except Exception as exc:
        from hvac import exceptions as hx

        return False if isinstance(exc, hx.Forbidden | hx.Unauthorized) else None
    return True


def translate_vault_error(
    exc: BaseException,
    address: str,
    capability: str,
    path: str,
    subject: str,
    *,
    probe: Any = None,
) -> KeysealError:
    """Map an hvac / requests error from one Vault call to a typed keyseal error with one clear line.

    `capability` and `path` are what the token's policy must grant for this call (e.g. "update" on
    "transit/sign/release"); `subject` says what was being done. With `probe` (the client), a permission
    denial is told apart from a token that is not valid at all by one `lookup-self` call.
    """
    if isinstance(exc, KeysealError):
        return exc
    from hvac import exceptions as hx
    from requests import exceptions as rx

    detail = _detail(exc)
    if isinstance(exc, hx.Forbidden | hx.Unauthorized):
        accepted = _token_accepted(probe) if probe is not None else None
        if accepted is False:
            return AccessDeniedError(
                f"Vault at {address} refused the token for {subject} ({detail}): the token is invalid or expired "
                f"(or lacks the default policy); set VAULT_TOKEN, KEYSEAL_VAULT_TOKEN_FILE or KEYSEAL_VAULT_K8S_ROLE"
            )
        return AccessDeniedError(
            f"Vault at {address} denied {subject} ({detail}): the token's policy needs the \"{capability}\" "
            f"capability on path \"{path}\" (see `keyseal vault-policy`)"
            + ("" if accepted else "; or the token is invalid or expired")
        )
    if isinstance(exc, hx.InvalidPath):
        if "no handler for route" in detail:
            mount = path.rsplit("/", 2)[0]  # "<mount>/<endpoint>/<key>"
            return KeyNotFoundError(
                f"Vault at {address} has no secrets engine at {path!r} for {subject} ({detail}): enable Transit "
                f"at the key URI's mount (e.g. `bao secrets enable -path={mount} transit`) or fix the mount"
            )
        return KeyNotFoundError(f"Vault at {address} has nothing at {path} for {subject}: check the key URI")
    if isinstance(exc, hx.InvalidRequest):
        lowered = detail.lower()
        if "key not found" in lowered:
            return KeyNotFoundError(
                f"Vault at {address}: {subject} failed, the Transit key does not exist ({detail}): check the key "
                f"URI, or create the key"
            )
        if "does not support" in lowered or "non-aead" in lowered or "key derivation" in lowered:
            return UnsupportedKeyError(f"Vault at {address}: {subject} failed, wrong key type ({detail})")
        return KeysealError(f"Vault at {address} refused {subject} ({detail})")
    if isinstance(exc, hx.VaultDown | hx.VaultNotInitialized):
        return BackendUnavailableError(
            f"Vault at {address} is sealed, not initialised or unavailable ({detail}) for {subject}: try again "
            f"once it is unsealed"
        )
    if isinstance(exc, hx.RateLimitExceeded | hx.BadGateway):
        return BackendUnavailableError(
            f"Vault at {address} kept failing {subject} ({detail}), even after retries: try again later or "
            f"raise KEYSEAL_VAULT_MAX_ATTEMPTS"
        )
    if isinstance(exc, hx.ParamValidationError):
        return UsageError(f"invalid Vault request for {subject}: {detail}")
    if isinstance(exc, hx.VaultError):
        return KeysealError(f"Vault at {address} failed {subject} ({detail})")
    if isinstance(exc, rx.SSLError):
        return BackendUnavailableError(
            f"TLS verification of Vault at {address} failed for {subject}: set VAULT_CACERT (or BAO_CACERT) to "
            f"the CA bundle that issued its certificate"
        )
    if isinstance(exc, rx.Timeout):
        return BackendUnavailableError(
            f"Vault at {address} did not answer {subject} in time: check the address and network, or raise "
            f"KEYSEAL_VAULT_CONNECT_TIMEOUT / KEYSEAL_VAULT_READ_TIMEOUT"
        )
    if isinstance(exc, rx.ConnectionError | rx.RetryError):
        return BackendUnavailableError(
            f"cannot reach Vault at {address} for {subject}: is it running? check VAULT_ADDR (or BAO_ADDR) and "
            f"the network"
        )
    if isinstance(exc, rx.RequestException):
        return BackendUnavailableError(f"Vault at {address}: {subject} failed ({type(exc).__name__})")
    return KeysealError(f"Vault at {address}: {subject} failed ({type(exc).__name__}: {one_line(str(exc))})")


@contextmanager
def vault_errors(client: Any, capability: str, path: str, subject: str) -> Iterator[None]:
    """Run one Vault call, turning any hvac / requests error into a typed keyseal error.

    Usage: `with vault_errors(client, "update", "transit/sign/k", "signing with ..."): transit.sign_data(...)`.
    """
    from hvac.exceptions import VaultError
    from requests.exceptions import RequestException

    try:
        yield
    except KeysealError:
        raise
    except (VaultError, RequestException, OSError) as exc:
        address = str(getattr(client, "url", "") or "the configured address")
        raise translate_vault_error(exc, address, capability, path, subject, probe=client) from None


# -- least-privilege policy -------------------------------------------------------------------------------

# purpose -> [(endpoint, capability, why)]
_POLICY: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sign": (
        ("keys", "read", "public key, key type and version creation times"),
        ("sign", "update", "one call per signature"),
    ),
    "wrap": (
        ("keys", "read", "key type check before records are written (aes256-gcm96)"),
        ("encrypt", "update", "wrap a record's DEK"),
        ("decrypt", "update", "unwrap a record's DEK"),
    ),
}


def policy_capabilities(ref: TransitKeyRef, purpose: str) -> list[tuple[str, str]]:
    """(path, capability) pairs a token needs on one key for one purpose ("sign" or "wrap")."""
    entries = _POLICY.get(purpose)
    if entries is None:
        raise UsageError(f"unknown policy purpose {purpose!r}: use sign or wrap")
    return [(ref.path(endpoint), capability) for endpoint, capability, _ in entries]


def policy_hcl(ref: TransitKeyRef, purpose: str) -> str:
    """The Vault / OpenBao policy (HCL) allowing exactly what keyseal needs on one Transit key.

    Only `update` (never `create`) on encrypt: Transit would otherwise create a missing key on first use.
    """
    entries = _POLICY.get(purpose)
    if entries is None:
        raise UsageError(f"unknown policy purpose {purpose!r}: use sign or wrap")
    lines = [f"# keyseal: {purpose} with Transit key {ref.key_uri} (nothing else)"]
    for endpoint, capability, why in entries:
        lines += [
            f"# {why}",
            f'path "{ref.path(endpoint)}" {{',
            f'  capabilities = ["{capability}"]',
            "}",
        ]
    return "\n".join(lines) + "\n"
