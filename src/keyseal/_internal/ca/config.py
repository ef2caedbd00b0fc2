"""The server configuration: a YAML file whose keys mirror the Helm chart's values (docs/server-api.md).

Every key is checked when the file is read, and an unknown key is an error (a typo must not silently fall back
to a default: `kmsKeyArn` instead of `kmsKeyARN` would otherwise start a server with the local KEK).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from keyseal._internal.ca.audit_logging import AuditLogging
from keyseal._internal.ca.k8s_config import K8sConfig, parse_kubernetes_section
from keyseal._internal.ca.sections import _Section
from keyseal._internal.durations import parse_duration
from keyseal._internal.spiffe.ids import check_path_prefix, check_trust_domain
from keyseal.errors import InputError, UsageError

__all__ = [
    "CA_KEY_TYPES",
    "ClientConfig",
    "Config",
    "ConnectionLimits",
    "FederationConfig",
    "ForeignTrustDomain",
    "OidcConfig",
    "default_alias_prefix",
    "load_config",
    "parse_config",
    "parse_duration",
]

# Config name -> the key type name keyseal's key generator and records use.
CA_KEY_TYPES: dict[str, str] = {"ec-p256": "p256", "ec-p384": "p384", "rsa-2048": "rsa2048", "rsa-4096": "rsa4096"}

_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_ARN_RE = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]{1,128}")
_RECORD_PREFIX_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,150}[a-z0-9])?")
_ALIAS_PREFIX_RE = re.compile(r"[a-zA-Z0-9/_-]{1,150}")
_NAMESPACE_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")



def default_alias_prefix(trust_domain: str) -> str:
    """Where custody kms puts its CA keys' aliases unless aws.keyManager.aliasPrefix says otherwise."""
    return f"keyseal/{trust_domain.replace('.', '_')}"



@dataclass(frozen=True)
class ClientConfig:
    """One client allowed to ask for SVIDs: a bearer token (its SHA-256) or a TLS client certificate."""

    name: str
    prefixes: tuple[str, ...]
    token_sha256: str | None = None
    cert_sha256: str | None = None
    cert_uri: str | None = None


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path | None = None
    key_file: Path | None = None
    self_issued_dns: tuple[str, ...] = ()
    self_issued_ips: tuple[str, ...] = ()
    client_ca_file: Path | None = None

    @property
    def self_issued(self) -> bool:
        """No certificate files: the server issues its own serving certificate from its CA."""
        return self.cert_file is None


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the listener holds (`server.connections`, docs/server-api.md): `max_connections` in
    all; `per_source` from one source address (an IPv6 /64 counts as one address); and once no more than
    `reserved` slots are free (the server is busy), a source gets a new one only while it holds fewer than
    `busy_share`: the last slots stay for node agents, probes and clients that hold few, not for whoever holds
    many."""

    max_connections: int = 256
    per_source: int = 32
    reserved: int = 64

    @property
    def busy_share(self) -> int:
        return max(1, self.per_source // 8)


@dataclass(frozen=True)
class VaultConfig:
    """A Vault / OpenBao Transit key as the KEK (`keyWrapping.provider: vault`). One token source: a token file,
    a Kubernetes auth role, or else VAULT_TOKEN / BAO_TOKEN in the environment. Never a token in the values."""

    address: str
    transit_key: str
    mount: str = "transit"
    token_file: Path | None = None
    kubernetes_role: str | None = None
    kubernetes_mount: str | None = None
    namespace: str | None = None
    ca_bundle: Path | None = None


@dataclass(frozen=True)
class Pkcs11Config:
    """The token that holds the CA keys (`custody: pkcs11`): a URI naming the token only, the module, and the
    PIN from a file (else KEYSEAL_PKCS11_PIN). Never a PIN in the values."""

    uri: str
    label_prefix: str
    module_path: str | None = None
    pin_file: str | None = None


@dataclass(frozen=True)
class OidcConfig:
    """The OIDC discovery listener (`oidc:`): its own address, and a certificate from files that does not change
    with CA rotation (cert-manager, a public CA), so that third parties can pin it for the long term."""

    listen_host: str
    listen_port: int
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class ForeignTrustDomain:
    """A trust domain this server federates with (`federation.trustDomains[]`, SPIFFE Federation)."""

    trust_domain: str
    bundle_endpoint_url: str
    profile: Literal["https_web", "https_spiffe"]
    endpoint_spiffe_id: str | None = None
    bundle_file: Path | None = None
    ca_file: Path | None = None  # https_web: the web PKI roots to trust instead of the system's


@dataclass(frozen=True)
class FederationConfig:
    """`federation:`: the bundle endpoint this server serves (if `listen` is set; certificate files for the
    https_web profile, else the server's own X.509-SVID for https_spiffe) and the foreign trust domains."""

    listen_host: str | None = None
    listen_port: int = 0
    cert_file: Path | None = None
    key_file: Path | None = None
    trust_domains: tuple[ForeignTrustDomain, ...] = ()


@dataclass(frozen=True)
class Config:
    trust_domain: str
    custody: str = "wrapped"  # a name in keyseal._internal.registry.CUSTODIES
    wrapping_provider: Literal["local", "awskms", "vault"] = "local"
    local_kek_file: Path | None = None
    vault: VaultConfig | None = None
    pkcs11: Pkcs11Config | None = None
    kms_key_arn: str | None = None
    aws_region: str | None = None
    kms_endpoint: str | None = None
    kms_alias_prefix: str = ""
    store_type: Literal["directory", "kubernetes"] = "directory"
    store_path: Path = Path("/var/lib/keyseal")
    ledger_file: Path | None = None
    kube_namespace: str | None = None
    kube_api_server: str | None = None
    record_prefix: str = ""
    ca_key_type: str = "ec-p256"
    jwt_key_type: str = "ec-p256"
    ca_ttl: timedelta = timedelta(days=1)
    x509_ttl: timedelta = timedelta(hours=1)
    jwt_ttl: timedelta = timedelta(minutes=5)
    jwt_issuer: str | None = None
    refresh_hint: timedelta = timedelta(minutes=5)
    # The longest a join token is honoured after it was created, whatever expiry the token itself names.
    join_token_max_ttl: timedelta = timedelta(hours=1)
    listen_host: str = "127.0.0.1"  # all addresses only when asked (server.listen: 0.0.0.0:8443, as the chart does)
    listen_port: int = 8443
    tls: TlsConfig = field(default_factory=TlsConfig)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    clients: tuple[ClientConfig, ...] = ()
    log_level: str = "info"
    kubernetes: K8sConfig | None = None  # node attestation and identity templates (ca.k8s_config)
    audit: AuditLogging = field(default_factory=AuditLogging)
    oidc: OidcConfig | None = None
    federation: FederationConfig = field(default_factory=FederationConfig)

    def kek_spec(self) -> str:
        """The KEK spec the wrapping library parses (`local:PATH`, `awskms:<ARN>` or `vault:MOUNT/KEY`)."""
        if self.wrapping_provider == "vault" and self.vault is not None:
            return f"vault:{self.vault.mount}/{self.vault.transit_key}"
        if self.wrapping_provider == "awskms":
            return f"awskms:{self.kms_key_arn}"
        return f"local:{self.local_kek_file}" if self.local_kek_file else "local"


def _listen(value: str, where: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{where}={value!r} is not HOST:PORT (e.g. 0.0.0.0:8443)")
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        if host != "localhost":
            raise UsageError(f"{where}={value!r}: the host must be an IP address or localhost") from exc
    return host, int(port_text)


def _clients(raw: object) -> tuple[ClientConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise UsageError("clients must be a list of client entries")
    clients: list[ClientConfig] = []
    names: set[str] = set()
    for index, item in enumerate(raw):
        section = _Section(item, f"clients[{index}]")
        name = section.text("name")
        if not name:
            raise UsageError(f"clients[{index}].name is missing: give every client a name (it appears in logs)")
        if name in names:
            raise UsageError(f"clients[{index}].name {name!r} is used twice")
        names.add(name)
        token = section.text("tokenSHA256")
        cert_hash = section.text("certSHA256")
        cert_uri = section.text("certURI")
        for key, value in (("tokenSHA256", token), ("certSHA256", cert_hash)):
            if value is not None and not _HEX64_RE.fullmatch(value):
                raise UsageError(
                    f"clients[{index}].{key} must be 64 lower-case hex digits (a SHA-256): e.g. "
                    f"printf %s \"$TOKEN\" | sha256sum"
                )
        if sum(v is not None for v in (token, cert_hash, cert_uri)) != 1:
            raise UsageError(
                f"clients[{index}] ({name}) needs exactly one credential: tokenSHA256, certSHA256 or certURI"
            )
        prefixes = section.strings("allowedPathPrefixes")
        if not prefixes:
            raise UsageError(
                f"clients[{index}].allowedPathPrefixes is empty: list the SPIFFE ID paths {name} may ask for "
                f"(e.g. /ns/a, or / for all)"
            )
        for prefix in prefixes:
            check_path_prefix(prefix)
        section.done()
        clients.append(ClientConfig(name, prefixes, token, cert_hash, cert_uri))
    tokens = [c.token_sha256 for c in clients if c.token_sha256]
    if len(tokens) != len(set(tokens)):
        raise UsageError("two clients have the same tokenSHA256: give each client its own token")
    return tuple(clients)


def parse_config(data: object) -> Config:
    """Check a parsed YAML document and build the Config."""
    root = _Section(data, "")
    trust_domain = root.text("trustDomain")
    if not trust_domain:
        raise UsageError("trustDomain is missing: set it to the SPIFFE trust domain, e.g. example.org")
    check_trust_domain(trust_domain)
    custody = _custody(root)
    values: dict[str, Any] = {"trust_domain": trust_domain, "custody": custody}
    values.update(_wrapping(root.section("keyWrapping")))
    values.update(_aws(root.section("aws"), trust_domain))
    values["vault"] = _vault(root.section("vault"), values["wrapping_provider"] == "vault" and custody == "wrapped")
    values["pkcs11"] = _pkcs11(root.section("pkcs11"), custody, trust_domain, values)
    _exactly_one_provider(custody, values)
    if custody == "wrapped" and values["wrapping_provider"] == "awskms":
        arn = values["kms_key_arn"]
        if not arn:
            raise UsageError(
                "aws.kmsKeyARN is required when keyWrapping.provider is awskms: set it to the ARN of the "
                "symmetric KMS key that wraps the CA keys"
            )
        if not _ARN_RE.fullmatch(arn):
            raise UsageError(
                f"aws.kmsKeyARN={arn!r} is not a KMS key ARN: use arn:aws:kms:REGION:ACCOUNT:key/KEY-ID"
            )
    values.update(_store(root.section("store"), trust_domain))
    values.update(_lifetimes(root))
    agents = root.section("agents")
    values["join_token_max_ttl"] = parse_duration(agents.get("joinTokenMaxTTL") or "1h", "agents.joinTokenMaxTTL")
    agents.done()
    if not timedelta(minutes=1) <= values["join_token_max_ttl"] <= timedelta(days=30):
        raise UsageError("agents.joinTokenMaxTTL must be between 1m and 30d: a join token mints an agent identity")
    values.update(_server(root.section("server")))
    values["clients"] = _clients(root.get("clients"))
    for client in values["clients"]:
        if client.cert_uri and client.cert_uri.lower().startswith(f"spiffe://{trust_domain}/"):
            raise UsageError(
                f"client {client.name}: certURI {client.cert_uri} is inside trust domain {trust_domain}, and the "
                f"server also accepts certificates from its own CA, so an SVID it issued for that ID (to a client "
                f"or an agent's workload) would authenticate as {client.name}: name the client by certSHA256"
            )
    if any(c.cert_sha256 or c.cert_uri for c in values["clients"]) and values["tls"].client_ca_file is None:
        raise UsageError(
            "a client authenticates with a TLS client certificate but server.tls.clientCAFile is not set: "
            "name the CA file that issued the client certificates"
        )
    values["log_level"] = root.choice("logLevel", ("debug", "info", "warning", "error"), "info")
    values["kubernetes"] = parse_kubernetes_section(root.section("kubernetes"), values["store_type"])
    values["audit"] = _audit(root.section("audit"))
    values["oidc"] = _oidc(root.section("oidc"), values["jwt_issuer"])
    values["federation"] = _federation(root.section("federation"), trust_domain)
    federation = values["federation"]
    if federation.listen_host is not None and federation.cert_file is None and not values["tls"].self_issued:
        raise UsageError(
            "federation.listen without federation.tls serves the https_spiffe profile with the server's own "
            "X.509-SVID, but server.tls.certFile replaces that SVID: set federation.tls.certFile/keyFile "
            "(https_web) or drop server.tls.certFile"
        )
    root.done()
    return Config(**values)


def _audit(section: _Section) -> AuditLogging:
    """`audit:` where the audit lines (one per SVID) go: keyseal._internal.ca.audit_logging."""
    level = section.choice("level", ("debug", "info", "warning"), "info")
    console = section.choice("console", ("auto", "lines", "summary", "off"), "auto")
    interval = parse_duration(section.get("summaryInterval") or "1m", "audit.summaryInterval")
    section.done()
    return AuditLogging(level, console, interval)


def _exactly_one_provider(custody: str, values: dict[str, Any]) -> None:
    """A KEK named for a provider that is not the configured one is a mistake worth stopping for: the server
    would otherwise wrap its keys with another KEK than the operator believes."""
    provider = values["wrapping_provider"]
    if custody != "wrapped":
        return
    if provider != "vault" and values["vault"] is not None:
        raise UsageError(f"vault.transitKey is set but keyWrapping.provider is {provider}: configure exactly one "
                         f"KEK provider (set provider: vault, or remove the vault section)")
    if provider == "vault" and values["kms_key_arn"]:
        raise UsageError("aws.kmsKeyARN is set but keyWrapping.provider is vault: configure exactly one KEK "
                         "provider (set provider: awskms, or empty aws.kmsKeyARN)")


_PKCS11_LABEL_PREFIX_RE = re.compile(r"[A-Za-z0-9._/:-]{0,100}")


def _pkcs11(section: _Section, custody: str, trust_domain: str, values: dict[str, Any]) -> Pkcs11Config | None:
    """`pkcs11:` for `custody: pkcs11`; set with another custody (or with a KEK) it is a mistake, not ignored."""
    uri, module_path, pin_file = section.text("uri"), section.text("modulePath"), section.text("pinFile")
    label_prefix = section.text("labelPrefix")
    section.done()
    if custody != "pkcs11":
        if uri or module_path or pin_file or label_prefix:
            raise UsageError(f"the pkcs11 section is set but custody is {custody}: set custody: pkcs11, or remove "
                             "the pkcs11 section")
        return None
    if values["kms_key_arn"] or values["vault"] is not None:
        raise UsageError("custody: pkcs11 keeps the CA keys in the token: remove aws.kmsKeyARN and vault.transitKey "
                         "(configure exactly one custody provider)")
    if not uri:
        raise UsageError("pkcs11.uri is required when custody is pkcs11: name the token, e.g. pkcs11:token=ca")
    from keyseal._internal.providers.pkcs11 import uri as pkcs11uri
    from keyseal.errors import KeysealError

    try:
        parsed = pkcs11uri.parse(uri)
    except KeysealError as exc:
        raise UsageError(f"pkcs11.uri: {exc.message}") from exc
    shown = parsed.redacted()
    if any(name in parsed.path for name in ("object", "id", "type")):
        raise UsageError(f"pkcs11.uri={shown!r} must name the token only: remove object=, id= and type= "
                         "(keyseal labels the CA keys itself, see pkcs11.labelPrefix)")
    if "module-path" in parsed.query and module_path:
        raise UsageError("pkcs11.modulePath and module-path= in pkcs11.uri are both set: keep one")
    if "module-name" in parsed.query:
        raise UsageError("pkcs11.uri: module-name= is not supported: set pkcs11.modulePath to the module's .so path")
    if "pin-source" in parsed.query and pin_file:
        raise UsageError("pkcs11.pinFile and pin-source= in pkcs11.uri are both set: keep pkcs11.pinFile")
    if "pin-value" in parsed.query and pin_file:
        raise UsageError("pkcs11.pinFile and pin-value= in pkcs11.uri are both set: keep pkcs11.pinFile and "
                         "remove pin-value= (it puts the PIN in the configuration in the clear)")
    prefix = f"keyseal/{trust_domain}/" if label_prefix is None else label_prefix
    if not _PKCS11_LABEL_PREFIX_RE.fullmatch(prefix):
        raise UsageError(f"pkcs11.labelPrefix={prefix!r}: use at most 100 letters, digits and . _ / : -")
    return Pkcs11Config(uri=uri, label_prefix=prefix, module_path=module_path, pin_file=pin_file)


def _vault(vault: _Section, required: bool) -> VaultConfig | None:
    address, transit_key = vault.text("address"), vault.text("transitKey")
    mount = (vault.text("mount") or "transit").strip("/")
    token_file = _optional_path(vault.text("tokenFile"))
    kubernetes_role, kubernetes_mount = vault.text("kubernetesRole"), vault.text("kubernetesMount")
    namespace, ca_bundle = vault.text("namespace"), _optional_path(vault.text("caBundle"))
    vault.done()
    if not transit_key:
        if required:
            raise UsageError("vault.transitKey is required when keyWrapping.provider is vault: name the "
                             "aes256-gcm96 Transit key that wraps the CA keys")
        return None
    if not address:
        raise UsageError("vault.address is required with vault.transitKey: e.g. https://vault.example.org:8200")
    if not address.startswith(("https://", "http://")):
        raise UsageError(f"vault.address={address!r} is not a URL: use https://HOST:PORT")
    return VaultConfig(address=address, transit_key=transit_key, mount=mount, token_file=token_file,
                       kubernetes_role=kubernetes_role, kubernetes_mount=kubernetes_mount, namespace=namespace,
                       ca_bundle=ca_bundle)


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _wrapping(wrapping: _Section) -> dict[str, Any]:
    provider = wrapping.choice("provider", ("local", "awskms", "vault"), "local")
    local = wrapping.section("local")
    kek_file = local.text("kekFile")
    local.done()
    wrapping.done()
    return {"wrapping_provider": provider, "local_kek_file": Path(kek_file) if kek_file else None}


def _aws(aws: _Section, trust_domain: str) -> dict[str, Any]:
    arn = aws.text("kmsKeyARN")
    region = aws.text("region")
    endpoints = aws.section("endpoints")
    kms_endpoint = endpoints.text("kms")
    endpoints.done()
    key_manager = aws.section("keyManager")
    alias_prefix = key_manager.text("aliasPrefix") or default_alias_prefix(trust_domain)
    key_manager.done()
    aws.done()
    if alias_prefix.startswith(("aws/", "alias/")) or not _ALIAS_PREFIX_RE.fullmatch(alias_prefix):
        raise UsageError(
            f"aws.keyManager.aliasPrefix={alias_prefix!r}: use letters, digits, '/', '_' and '-', without "
            f"alias/ and outside aws/"
        )
    return {"kms_key_arn": arn, "aws_region": region, "kms_endpoint": kms_endpoint,
            "kms_alias_prefix": alias_prefix}


def _store(store: _Section, trust_domain: str) -> dict[str, Any]:
    store_type = store.choice("type", ("directory", "kubernetes"), "directory")
    record_prefix = store.text("recordPrefix") or _default_record_prefix(trust_domain)
    if not _RECORD_PREFIX_RE.fullmatch(record_prefix):
        raise UsageError(
            f"store.recordPrefix={record_prefix!r}: use lower-case letters, digits, '.' and '-' (at most 152)"
        )
    directory = store.section("directory")
    store_path = Path(directory.text("path", "/var/lib/keyseal") or "/var/lib/keyseal")
    ledger_text = directory.text("ledgerFile")
    directory.done()
    kube = store.section("kubernetes")
    namespace = kube.text("namespace")
    api_server = kube.text("apiServer")
    kube.done()
    store.done()
    if namespace is not None and not _NAMESPACE_RE.fullmatch(namespace):
        raise UsageError(f"store.kubernetes.namespace={namespace!r} is not a Kubernetes namespace name")
    return {"store_type": store_type, "record_prefix": record_prefix, "store_path": store_path,
            "ledger_file": Path(ledger_text) if ledger_text else None, "kube_namespace": namespace,
            "kube_api_server": api_server}


def _lifetimes(root: _Section) -> dict[str, Any]:
    ca = root.section("ca")
    ca_key_type = ca.choice("keyType", tuple(CA_KEY_TYPES), "ec-p256")
    ca_ttl = parse_duration(ca.get("ttl") or "24h", "ca.ttl")
    ca.done()
    x509 = root.section("x509SVID")
    x509_ttl = parse_duration(x509.get("ttl") or "1h", "x509SVID.ttl")
    x509.done()
    jwt = root.section("jwtSVID")
    jwt_ttl = parse_duration(jwt.get("ttl") or "5m", "jwtSVID.ttl")
    jwt_key_type = jwt.choice("keyType", tuple(CA_KEY_TYPES), ca_key_type)
    issuer = jwt.text("issuer")
    jwt.done()
    if issuer is not None:
        _check_issuer(issuer)
    bundle = root.section("bundle")
    refresh_hint = parse_duration(bundle.get("refreshHint") or "5m", "bundle.refreshHint")
    bundle.done()
    for name, ttl in (("x509SVID.ttl", x509_ttl), ("jwtSVID.ttl", jwt_ttl)):
        if ttl > ca_ttl / 6:
            raise UsageError(
                f"{name} ({_show(ttl)}) must be at most a sixth of ca.ttl ({_show(ca_ttl)}): the active CA "
                f"must be able to sign a full-length SVID until the next keyset takes over"
            )
    if refresh_hint > ca_ttl / 6:
        raise UsageError(
            f"bundle.refreshHint ({_show(refresh_hint)}) must be at most a sixth of ca.ttl ({_show(ca_ttl)}): "
            f"clients must see a prepared key well before it becomes active"
        )
    return {"ca_key_type": ca_key_type, "jwt_key_type": jwt_key_type, "ca_ttl": ca_ttl, "x509_ttl": x509_ttl,
            "jwt_ttl": jwt_ttl, "refresh_hint": refresh_hint, "jwt_issuer": issuer}


def _server(server: _Section) -> dict[str, Any]:
    host, port = _listen(server.text("listen", "127.0.0.1:8443") or "", "server.listen")
    tls_section = server.section("tls")
    cert_file = tls_section.text("certFile")
    key_file = tls_section.text("keyFile")
    client_ca = tls_section.text("clientCAFile")
    self_issued = tls_section.section("selfIssued")
    dns_names = self_issued.strings("dnsNames")
    ip_addresses = self_issued.strings("ipAddresses")
    self_issued.done()
    tls_section.done()
    connections = _connections(server.section("connections"))
    server.done()
    if (cert_file is None) != (key_file is None):
        raise UsageError("server.tls.certFile and server.tls.keyFile go together: set both or neither")
    for ip in ip_addresses:
        try:
            ipaddress.ip_address(ip)
        except ValueError as exc:
            raise UsageError(f"server.tls.selfIssued.ipAddresses: {ip!r} is not an IP address") from exc
    tls = TlsConfig(
        cert_file=Path(cert_file) if cert_file else None,
        key_file=Path(key_file) if key_file else None,
        self_issued_dns=dns_names,
        self_issued_ips=ip_addresses,
        client_ca_file=Path(client_ca) if client_ca else None,
    )
    return {"listen_host": host, "listen_port": port, "tls": tls, "connections": connections}


def _check_issuer(issuer: str) -> None:
    """An OIDC issuer: an https URL without query, fragment, user info or trailing slash (OpenID Connect
    Discovery 1.0; AWS, GCP and Azure compare it byte for byte with the token's `iss`)."""
    parsed = urllib.parse.urlsplit(issuer)
    if (parsed.scheme != "https" or not parsed.hostname or parsed.query or parsed.fragment or "@" in parsed.netloc
            or issuer.endswith("/") or not issuer.isprintable() or " " in issuer or len(issuer) > 255):
        raise UsageError(f"jwtSVID.issuer={issuer[:80]!r} is not an OIDC issuer: use an https URL without a "
                         f"trailing slash, query or fragment, e.g. https://oidc.example.org")


def _oidc(section: _Section, issuer: str | None) -> OidcConfig | None:
    listen = section.text("listen")
    tls = section.section("tls")
    cert_file, key_file = tls.text("certFile"), tls.text("keyFile")
    tls.done()
    section.done()
    if listen is None:
        if cert_file or key_file:
            raise UsageError("oidc.tls is set but oidc.listen is not: set oidc.listen (e.g. 0.0.0.0:8444)")
        return None
    host, port = _listen(listen, "oidc.listen")
    if issuer is None:
        raise UsageError("oidc.listen is set but jwtSVID.issuer is not: set the issuer URL that third parties "
                         "reach this listener at (e.g. https://oidc.example.org)")
    if not cert_file or not key_file:
        raise UsageError("oidc.tls.certFile and oidc.tls.keyFile are required with oidc.listen: the discovery "
                         "listener serves a certificate from files (cert-manager, a public CA) that does not "
                         "change with CA rotation")
    return OidcConfig(host, port, Path(cert_file), Path(key_file))


MAX_FOREIGN_TRUST_DOMAINS = 64


def _federation(section: _Section, own_trust_domain: str) -> FederationConfig:
    listen = section.text("listen")
    tls = section.section("tls")
    cert_file, key_file = tls.text("certFile"), tls.text("keyFile")
    tls.done()
    raw = section.get("trustDomains")
    section.done()
    if (cert_file is None) != (key_file is None):
        raise UsageError("federation.tls.certFile and federation.tls.keyFile go together: set both or neither")
    host, port = _listen(listen, "federation.listen") if listen else (None, 0)
    if raw is None:
        raw = []
    if not isinstance(raw, list) or len(raw) > MAX_FOREIGN_TRUST_DOMAINS:
        raise UsageError(f"federation.trustDomains must be a list of at most {MAX_FOREIGN_TRUST_DOMAINS} entries")
    domains: list[ForeignTrustDomain] = []
    for index, item in enumerate(raw):
        domains.append(_foreign(_Section(item, f"federation.trustDomains[{index}]"), own_trust_domain))
    names = [d.trust_domain for d in domains]
    if len(set(names)) != len(names):
        raise UsageError("federation.trustDomains names a trust domain twice")
    return FederationConfig(host, port, Path(cert_file) if cert_file else None,
                            Path(key_file) if key_file else None, tuple(domains))


def _foreign(item: _Section, own_trust_domain: str) -> ForeignTrustDomain:
    name = item.text("trustDomain")
    url = item.text("bundleEndpointURL")
    profile = item.choice("profile", ("https_web", "https_spiffe"), "https_spiffe")
    endpoint_id, bundle_file, ca_file = item.text("endpointSPIFFEID"), item.text("bundleFile"), item.text("caFile")
    item.done()
    if not name:
        raise UsageError(f"{item.key('trustDomain')} is missing")
    check_trust_domain(name)
    if name == own_trust_domain:
        raise UsageError(f"{item.key('trustDomain')}: {name} is this server's own trust domain")
    if not url or urllib.parse.urlsplit(url).scheme != "https" or not urllib.parse.urlsplit(url).hostname:
        raise UsageError(f"{item.key('bundleEndpointURL')} must be an https URL")
    if profile == "https_spiffe":
        if not endpoint_id or not bundle_file:
            raise UsageError(f"{item.where}: the https_spiffe profile needs endpointSPIFFEID (the endpoint's "
                             f"SPIFFE ID) and bundleFile (the trust domain's bundle, obtained once out of band)")
        from keyseal._internal.spiffe.ids import parse_spiffe_id

        if parse_spiffe_id(endpoint_id).trust_domain != name:
            raise UsageError(f"{item.key('endpointSPIFFEID')}={endpoint_id[:80]!r} is not in trust domain {name}: "
                             f"the endpoint is authenticated with that trust domain's bundle")
    elif endpoint_id:
        raise UsageError(f"{item.key('endpointSPIFFEID')} is for the https_spiffe profile only")
    return ForeignTrustDomain(name, url, profile,  # type: ignore[arg-type]
                              endpoint_id, Path(bundle_file) if bundle_file else None,
                              Path(ca_file) if ca_file else None)


MAX_CONNECTIONS_LIMIT = 16384


def _connections(section: _Section) -> ConnectionLimits:
    default = ConnectionLimits()
    most = section.integer("max", default.max_connections, 1, MAX_CONNECTIONS_LIMIT)
    per_source = section.integer("perSource", min(default.per_source, most), 1, most)
    reserved = section.integer("reserved", min(default.reserved, most // 4), 0, most - 1)
    section.done()
    return ConnectionLimits(most, per_source, reserved)


def _default_record_prefix(trust_domain: str) -> str:
    """`keyseal-<trust domain>`, made a valid Kubernetes name ('_' -> '-'; a long name is shortened + hashed)."""
    slug = trust_domain.replace("_", "-").strip(".-") or "td"
    if len(slug) > 100:
        slug = slug[:80].rstrip(".-") + "-" + hashlib.sha256(trust_domain.encode()).hexdigest()[:12]
    return f"keyseal-{slug}"


def _show(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    return f"{seconds}s"


def load_config(path: Path) -> Config:
    """Read and check the YAML configuration file."""
    try:
        import yaml
    except ImportError as exc:
        raise UsageError("the server needs PyYAML: pip install 'keyseal[server]'") from exc
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"configuration file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read configuration file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"configuration file {path} is not valid YAML{where}") from exc
    try:
        config = parse_config(data)
        _refuse_host_defaults(data, config)
    except UsageError as exc:
        raise type(exc)(f"{path}: {exc.message}") from exc
    return config


def _given(data: object, *keys: str) -> bool:
    for key in keys:
        if not isinstance(data, Mapping):
            return False
        data = data.get(key)
    return bool(data)


def _refuse_host_defaults(data: object, config: Config) -> None:
    """A configuration file must say where the server keeps its keys: a default would put them in the host's
    /var/lib/keyseal (as root) or wrap them with the KEK in the user's own keyseal home. `keyseal dev` is the way
    to try the server without choosing either."""
    if config.store_type == "directory" and not _given(data, "store", "directory", "path"):
        raise UsageError("store.directory.path is not set: name the directory that keeps the CA's wrapped keys "
                         "(e.g. /var/lib/keyseal), or try keyseal dev for a local trust domain")
    if config.custody == "wrapped" and config.wrapping_provider == "local" and config.local_kek_file is None:
        raise UsageError("keyWrapping.local.kekFile is not set: name the KEK file that wraps the CA keys (keep "
                         "it apart from the store), or try keyseal dev for a local trust domain")


def _custody(root: _Section) -> str:
    """`custody`: a built-in (wrapped, kms, pkcs11) or one another package registers; entry points are read only
    for a name that is not a built-in."""
    from keyseal._internal.registry import CUSTODIES

    value = root.text("custody", "wrapped")
    assert value is not None
    if value not in CUSTODIES:
        builtins = ("wrapped", "kms", "pkcs11")  # first, as the configuration reference lists them
        names = builtins + tuple(name for name in CUSTODIES.names() if name not in builtins)
        raise UsageError(f"{root.key('custody')}={value!r} is not one of {', '.join(names)}")
    return value
