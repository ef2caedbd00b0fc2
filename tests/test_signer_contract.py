"""The Signer contract (keyseal.signer), one suite run over every backend against its real custody.

Each backend is one fixture, decorated `@signer_backend` (`slow=True` when it talks to a server or token), that
returns a `Backend`: keys made in the custody by its own tools (boto3 against the moto server, OpenBao's API, the
PKCS#11 token, a wrapped record with a local KEK), a URI naming a key that does not exist, and the hashes the
backend documents for each key type. Every test below runs over every such fixture, so a new backend gets the
whole suite by adding one fixture.

What every backend must do, opened through the registry (`open_signer`, as every caller opens it):
- `public_key()` is the key's type and size, the same on every call and every open, and the custody's own
  public key where the test can read that independently;
- `supported_hashes()` is what the backend's documentation claims, and `sign_digest` signs with each of them
  in the contract's encoding (RSA PKCS#1 v1.5, DER ECDSA, raw Ed25519), checked by `cryptography`'s verify;
- a hash the key does not claim, an unknown hash, or a digest of the wrong length is refused with a typed
  KeysealError, one line, before anything is signed;
- an Ed25519 key signs messages of any length (`sign_message`); other keys refuse to;
- a missing key is one typed error with one line that names the key;
- an OpenPGP certificate and detached signature made through keyseal with the signer verify with sqv
  (Sequoia's verifier), and the signature fails for other data;
- `close()` may be called twice.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keyseal._internal.backends import BackendOptions, open_signer
from keyseal._internal.keygen import generate_private_key
from keyseal._internal.openpgp.cert import load_certificates, mint_certificate
from keyseal._internal.openpgp.sign import choose_hash, identity_from_certificate, signature_packet
from keyseal._internal.openpgp.signature import HASH_IDS, new_hasher
from keyseal._internal.store.directory import DirectoryStore
from keyseal._internal.wrapping.kek import parse_kek
from keyseal._internal.wrapping.keys import create_record
from keyseal.errors import InputError, KeyNotFoundError, KeysealError, UnsupportedKeyError, UsageError
from keyseal.signer import HASH_NAMES, HashName, PublicKey, Signer, hash_algorithm
from tests.conftest import REGION, sqv_verify
from tests.harness.kms_emulator import KmsEmulator
from tests.harness.openbao import OpenBao
from tests.harness.softhsm import USER_PIN, SoftHsm

ALL: tuple[HashName, ...] = HASH_NAMES


@dataclass(frozen=True)
class Backend:
    """One custody as the suite sees it."""

    keys: Mapping[str, str]  # key type (rsa2048, p256, p384, p521, ed25519) -> URI of a key the custody made
    claims: Mapping[str, tuple[HashName, ...]]  # key type -> the hashes the backend documents for it
    missing: str  # a well-formed URI naming no key
    missing_error: type[KeysealError]  # what opening or using it raises today
    missing_name: str  # the part of `missing` its error message names
    options: BackendOptions | None = None
    reference: Callable[[str], PublicKey] | None = None  # key type -> the public key as the custody reports it

    def open(self, uri: str) -> Signer:
        return open_signer(uri, self.options)


BACKENDS: list[Any] = []  # pytest.param(fixture name), marked slow for a remote custody


def signer_backend(function: Callable[..., Any] | None = None, *, slow: bool = False) -> Any:
    """Register a function-scoped fixture returning a Backend: every test here then runs over it. `slow`: it
    talks to a server or token (left out of the fast loop, `-m "not slow"`)."""
    def register(function: Callable[..., Any]) -> Any:
        BACKENDS.append(pytest.param(function.__name__, marks=[pytest.mark.slow] if slow else []))
        return pytest.fixture(function)

    return register(function) if function is not None else register


# -- the backends ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def file_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, PublicKey]]:
    """Wrapped key records (as `keyseal keys create` writes them) under a local KEK of their own."""
    root = tmp_path_factory.mktemp("file-keys")
    kek = f"local:{root / 'kek'}"
    store = DirectoryStore(root / "keys")
    public: dict[str, PublicKey] = {}
    for key_type in ("rsa2048", "p256", "p384", "p521", "ed25519"):
        key = generate_private_key(key_type)
        create_record(store, f"{key_type}.key", key, parse_kek(kek))
        public[key_type] = key.public_key()
    return root / "keys", kek, public


@signer_backend
def file_backend(file_keys: tuple[Path, str, dict[str, PublicKey]]) -> Backend:
    """`file:` wrapped records: every key type keygen makes, every hash (the Signer default)."""
    directory, kek, public = file_keys
    return Backend(
        keys={key_type: f"file:{directory / f'{key_type}.key'}" for key_type in public},
        claims=dict.fromkeys(public, ALL),
        missing=f"file:{directory / 'absent.key'}", missing_error=InputError, missing_name="absent.key",
        options=BackendOptions(kek=kek), reference=public.__getitem__,
    )


KMS_SPECS = {"rsa2048": "RSA_2048", "p256": "ECC_NIST_P256", "p384": "ECC_NIST_P384", "p521": "ECC_NIST_P521"}


def kms_admin(endpoint: str) -> Any:
    return boto3.client("kms", region_name=REGION, endpoint_url=endpoint, aws_access_key_id="admin",
                        aws_secret_access_key="admin")


@pytest.fixture(scope="session")
def kms_keys(kms_emulator: KmsEmulator) -> dict[str, str]:
    """Signing keys made by plain boto3 (not keyseal): key type -> key ARN."""
    client = kms_admin(kms_emulator.endpoint)
    return {key_type: client.create_key(KeyUsage="SIGN_VERIFY", KeySpec=spec)["KeyMetadata"]["Arn"]
            for key_type, spec in KMS_SPECS.items()}


@signer_backend(slow=True)
def awskms_backend(kms_keys: dict[str, str], aws_env: dict[str, str], kms_emulator: KmsEmulator) -> Backend:
    """`awskms:` (module docstring): RSA with every hash (RSASSA_PKCS1_V1_5_SHA_*), ECDSA with the curve's own."""
    def reference(key_type: str) -> PublicKey:
        der = kms_admin(kms_emulator.endpoint).get_public_key(KeyId=kms_keys[key_type])["PublicKey"]
        key = serialization.load_der_public_key(der)
        assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        return key

    return Backend(
        keys={key_type: f"awskms:{arn}" for key_type, arn in kms_keys.items()},
        claims={"rsa2048": ALL, "p256": ("sha256",), "p384": ("sha384",), "p521": ("sha512",)},
        missing="awskms:alias/contract/absent", missing_error=KeyNotFoundError, missing_name="alias/contract/absent",
        reference=reference,
    )


PKCS11_TOKEN = "keyseal-contract"


@pytest.fixture(scope="session")
def pkcs11_keys(softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Key pairs generated inside a SoftHSM2 token of this suite's own: key type -> URI (PIN from a file)."""
    from keyseal._internal.backends import pkcs11

    pin = tmp_path_factory.mktemp("pkcs11-pin") / "pin"
    pin.write_text(USER_PIN + "\n")
    softhsm.init_token(PKCS11_TOKEN)
    uris = {}
    for key_type in ("rsa2048", "p256", "p384", "p521", "ed25519"):
        uris[key_type] = softhsm.uri(PKCS11_TOKEN, f"contract-{key_type}", pin_source=f"file:{pin}")
        pkcs11.create_key(uris[key_type], key_type)
    uris["absent"] = softhsm.uri(PKCS11_TOKEN, "contract-absent", pin_source=f"file:{pin}")
    return uris


@signer_backend(slow=True)
def pkcs11_backend(pkcs11_keys: dict[str, str]) -> Iterator[Backend]:
    """`pkcs11:` (module docstring): CKM_RSA_PKCS over a DigestInfo for SHA-256/384/512, CKM_ECDSA and
    CKM_EDDSA over any digest: every key type, every hash. The suite's only view of the public key is the
    token's, through keyseal (signatures that verify with it show it is the private key's)."""
    from keyseal._internal.providers.pkcs11 import session as pkcs11_session

    keys = {key_type: uri for key_type, uri in pkcs11_keys.items() if key_type != "absent"}
    yield Backend(keys=keys, claims=dict.fromkeys(keys, ALL), missing=pkcs11_keys["absent"],
                  missing_error=KeyNotFoundError, missing_name="contract-absent")
    leaked = list(pkcs11_session._SESSIONS)
    pkcs11_session.close_all_sessions()
    assert not leaked, f"sessions left open: {leaked}"


VAULT_TYPES = {"rsa2048": "rsa-2048", "p256": "ecdsa-p256", "p384": "ecdsa-p384", "p521": "ecdsa-p521",
               "ed25519": "ed25519"}


@pytest.fixture(scope="session")
def vault_keys(openbao: OpenBao) -> dict[str, str]:
    """Transit keys made through OpenBao's own API: key type -> key name."""
    names = {}
    for key_type, transit_type in VAULT_TYPES.items():
        names[key_type] = f"contract-{key_type}"
        openbao.create_key(names[key_type], transit_type)
    return names


@signer_backend(slow=True)
def hashivault_backend(vault_keys: dict[str, str], vault_env: dict[str, str], openbao: OpenBao) -> Backend:
    """`hashivault:` (module docstring): every Transit key type signs every SHA-2 digest."""
    def reference(key_type: str) -> PublicKey:
        data = openbao.read_key(vault_keys[key_type])
        text = data["keys"][str(data["latest_version"])]["public_key"]
        if data["type"] == "ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(text))
        key = serialization.load_pem_public_key(text.encode())
        assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        return key

    return Backend(
        keys={key_type: f"hashivault://transit/{name}" for key_type, name in vault_keys.items()},
        claims=dict.fromkeys(vault_keys, ALL),
        missing="hashivault://transit/contract-absent", missing_error=KeyNotFoundError,
        missing_name="contract-absent", reference=reference,
    )


@pytest.fixture(params=BACKENDS)  # after every @signer_backend: pytest copies the list
def backend(request: pytest.FixtureRequest) -> Backend:
    found: Backend = request.getfixturevalue(request.param)
    return found


# -- independent checks ----------------------------------------------------------------------------------------


def spki(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify(public_key: PublicKey, signature: bytes, digest: bytes, hash_name: HashName) -> None:
    """`cryptography`'s verify of the contract's encoding; raises InvalidSignature."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, digest)  # the digest is the message (OpenPGP v4 EdDSA)
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hash_algorithm(hash_name)))
    else:
        public_key.verify(signature, digest, ec.ECDSA(utils.Prehashed(hash_algorithm(hash_name))))


def check_type(key_type: str, public_key: PublicKey) -> None:
    if key_type.startswith("rsa"):
        assert isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == int(key_type[3:]), key_type
    elif key_type == "ed25519":
        assert isinstance(public_key, ed25519.Ed25519PublicKey), key_type
    else:
        curve = {"p256": "secp256r1", "p384": "secp384r1", "p521": "secp521r1"}[key_type]
        assert isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == curve, key_type


def check_encoding(public_key: PublicKey, signature: bytes) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        assert len(signature) == public_key.key_size // 8  # raw PKCS#1 v1.5, not DER
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        assert len(signature) == 64
    else:
        utils.decode_dss_signature(signature)  # DER Ecdsa-Sig-Value


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message and message.strip() == message, message
    return message


# -- the contract ------------------------------------------------------------------------------------------------


def test_public_key_is_the_custodys_and_stable(backend: Backend) -> None:
    for key_type, uri in backend.keys.items():
        with backend.open(uri) as signer:
            public = signer.public_key()
            check_type(key_type, public)
            assert spki(signer.public_key()) == spki(public), key_type
        with backend.open(uri) as again:
            assert spki(again.public_key()) == spki(public), key_type
        if backend.reference is not None:
            assert spki(backend.reference(key_type)) == spki(public), key_type


def test_every_claimed_hash_signs_and_verifies(backend: Backend) -> None:
    for key_type, uri in backend.keys.items():
        with backend.open(uri) as signer:
            assert signer.supported_hashes() == backend.claims[key_type], key_type
            public = backend.reference(key_type) if backend.reference is not None else signer.public_key()
            for hash_name in backend.claims[key_type]:
                digest = hashlib.new(hash_name, f"contract {key_type} {hash_name}".encode()).digest()
                signature = signer.sign_digest(digest, hash_name)
                check_encoding(public, signature)
                verify(public, signature, digest, hash_name)
                with pytest.raises(InvalidSignature):
                    verify(public, signature, hashlib.new(hash_name, b"other").digest(), hash_name)


def test_unclaimed_unknown_and_malformed_digests_are_refused(backend: Backend) -> None:
    for key_type, uri in backend.keys.items():
        with backend.open(uri) as signer:
            claimed = backend.claims[key_type]
            unusable: list[tuple[bytes, Any]] = [(hashlib.new(h, b"x").digest(), h) for h in ALL if h not in claimed]
            unusable.append((hashlib.sha1(b"x").digest(), "sha1"))  # a hash no backend may accept
            malformed = [hashlib.new(claimed[0], b"x").digest()[:20],  # too short for its hash
                         hashlib.new(claimed[0], b"x").digest() + b"\0"]  # too long
            cases = [(digest, hash_name, True) for digest, hash_name in unusable]
            cases += [(digest, claimed[0], False) for digest in malformed]
            for digest, hash_name, names_usable in cases:
                with pytest.raises(KeysealError) as caught:
                    signer.sign_digest(digest, hash_name)
                assert isinstance(caught.value, UsageError | UnsupportedKeyError), (key_type, hash_name, caught)
                message = one_line(caught.value)
                assert hash_name in message, message
                if names_usable:  # a refused hash says which to use instead
                    assert any(h in message for h in claimed), message


def test_sign_message_only_for_ed25519(backend: Backend) -> None:
    message = b"ssh signature input " * 50  # longer than any digest
    for uri in backend.keys.values():
        with backend.open(uri) as signer:
            public = signer.public_key()
            if isinstance(public, ed25519.Ed25519PublicKey):
                public.verify(signer.sign_message(message), message)
            else:
                with pytest.raises(UnsupportedKeyError) as caught:
                    signer.sign_message(message)
                one_line(caught.value)


def test_missing_key_is_one_typed_error(backend: Backend) -> None:
    calls: dict[str, Callable[[Signer], object]] = {
        "public_key": lambda signer: signer.public_key(),
        "sign_digest": lambda signer: signer.sign_digest(hashlib.sha256(b"x").digest(), "sha256"),
    }
    for name, call in calls.items():
        with pytest.raises(KeysealError) as caught, backend.open(backend.missing) as signer:  # open, or first use
            call(signer)
        assert type(caught.value) is backend.missing_error, (name, caught.value)
        assert backend.missing_name in one_line(caught.value), name


def test_close_twice(backend: Backend) -> None:
    uri = next(iter(backend.keys.values()))
    signer = backend.open(uri)
    hash_name = signer.supported_hashes()[0]
    digest = hashlib.new(hash_name, b"x").digest()
    verify(signer.public_key(), signer.sign_digest(digest, hash_name), digest, hash_name)
    signer.close()
    signer.close()


def test_openpgp_detached_signature_verifies_with_sqv(backend: Backend, tmp_path: Path) -> None:
    """A certificate minted and a file signed through keyseal's OpenPGP code with this signer, each key type at
    its natural hash; sqv (an independent implementation) accepts it, and refuses it for other data."""
    data = tmp_path / "release.tar"
    data.write_bytes(b"release contents\n" * 1000)
    other = tmp_path / "other.tar"
    other.write_bytes(b"release contents\n" * 999)
    for key_type, uri in backend.keys.items():
        with backend.open(uri) as signer:
            cert = tmp_path / f"{key_type}.pgp"
            cert.write_bytes(mint_certificate(signer, name="Contract", email="contract@example.org",
                                              created=int(time.time()) - 60))
            identity = identity_from_certificate(signer, load_certificates(cert.read_bytes()))
            hash_name = choose_hash(signer, signer.public_key(), None)
            hasher = new_hasher(HASH_IDS[hash_name])
            hasher.update(data.read_bytes())
            signature = tmp_path / f"{key_type}.sig"
            signature.write_bytes(signature_packet(signer, identity, hasher, hash_name))
        accepted = sqv_verify(cert, signature, data)
        assert accepted.returncode == 0, (key_type, hash_name, accepted.stderr.decode(errors="replace"))
        assert sqv_verify(cert, signature, other).returncode != 0, key_type
