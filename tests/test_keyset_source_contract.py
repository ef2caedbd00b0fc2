"""The keyset-source contract (keyseal._internal.ca.custody.source), one suite run over every CA custody.

Each custody is one fixture, decorated `@custody` (`slow=True` when it talks to a server or token), that returns
a `Custody`: a way to build a source over one fresh custody as the server builds it (`build_source` from a parsed
configuration), so that a second call is another replica or a restart over the same keys, and a source whose
custody cannot be used. Every test below runs over every such fixture, so a new custody gets the whole suite by
adding one fixture.

What every custody must do (source.py):
- on an empty custody, `startup_check` passes and writes nothing, and `load` finds no keyset (highest 0); a
  custody that cannot be used fails `startup_check` with a typed, one-line error and writes nothing;
- `create(n)` makes keyset n with the configured key types and the given not_before; the keys sign (digests,
  a certificate through `builder_key`, a JWS) and the signatures verify with their public keys;
- another source over the same custody loads the same keys and times, and its `create(n)` of an existing
  keyset returns False and changes nothing;
- `load(live_after)` returns the keysets whose not_before is after `live_after`, ordered by number, and the
  highest number ever created even when that keyset has expired; a reload keeps the keys it opened;
- a place still held by a live keyset is a SlotBusyError (wrapped custody: a ring of SLOTS places); a custody
  without places keeps every live keyset.

Keyset pins (the key managers' record of which keys keyseal made) are not part of source.py's contract: they
are tested per custody in test_ca_pins.py, test_ca_kms_pins.py and test_ca_pkcs11_pins.py.
"""

from __future__ import annotations

import hashlib
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.custody.keys import CaKey, jws_hash_name, jws_signature
from keyseal._internal.ca.custody.source import KeysetKeys, KeysetSource, SlotBusyError
from keyseal._internal.ca.custody.wrapped import SLOTS
from keyseal._internal.ca.server import build_source
from keyseal.errors import AccessDeniedError, BackendUnavailableError, InvalidKeyFileError, KeysealError
from keyseal.signer import PublicKey, hash_algorithm
from tests.harness.ca import START, base_config
from tests.harness.kms_emulator import KmsEmulator
from tests.harness.softhsm import USER_PIN, SoftHsm

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
KEY_TYPES = {"ca": {"keyType": "ec-p384"}, "jwtSVID": {"keyType": "ec-p256"}}  # one of each, so kinds cannot mix
CURVES = {"x509": "secp384r1", "jwt": "secp256r1"}


@dataclass(frozen=True)
class Custody:
    """One CA custody as the suite sees it."""

    source: Callable[[], KeysetSource]  # a new source over this test's custody (a replica, a restart)
    broken: Callable[[], KeysetSource]  # a source over the same custody that cannot be used
    broken_error: type[KeysealError]
    key_class: str  # what CaKey.custody says for its keys
    places: int | None  # how many keysets it holds at once (wrapped: the slot ring), None: no limit


CUSTODIES: list[Any] = []  # pytest.param(fixture name), marked slow for a remote custody


def custody(function: Callable[..., Any] | None = None, *, slow: bool = False) -> Any:
    """Register a function-scoped fixture returning a Custody: every test here then runs over it. `slow`: it
    talks to a server or token (left out of the fast loop, `-m "not slow"`)."""
    def register(function: Callable[..., Any]) -> Any:
        CUSTODIES.append(pytest.param(function.__name__, marks=[pytest.mark.slow] if slow else []))
        return pytest.fixture(function)

    return register(function) if function is not None else register


def source_from(raw: dict[str, Any]) -> Callable[[], KeysetSource]:
    return lambda: build_source(parse_config(raw))


@custody
def wrapped_custody(tmp_path: Path) -> Custody:
    """Wrapped records in a directory store under a local KEK; broken: a KEK file that holds no KEK."""
    bad_kek = tmp_path / "bad-kek"
    bad_kek.write_bytes(b"not a key encryption key\n")
    bad_kek.chmod(0o600)
    return Custody(
        source=source_from(base_config(tmp_path, **KEY_TYPES)),
        broken=source_from(base_config(tmp_path, keyWrapping={"provider": "local",
                                                              "local": {"kekFile": str(bad_kek)}}, **KEY_TYPES)),
        broken_error=InvalidKeyFileError, key_class="wrapped", places=SLOTS,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@custody(slow=True)
def kms_custody(tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str],
                monkeypatch: pytest.MonkeyPatch) -> Custody:
    """AWS KMS keys (the moto server) under an alias prefix of this test's own; broken: an endpoint nobody
    answers."""
    monkeypatch.setenv("KEYSEAL_KMS_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "1")
    prefix = f"contract/{uuid.uuid4().hex[:8]}"

    def config(endpoint: str) -> dict[str, Any]:
        return base_config(tmp_path, custody="kms", aws={"endpoints": {"kms": endpoint},
                                                          "keyManager": {"aliasPrefix": prefix}}, **KEY_TYPES)

    return Custody(source=source_from(config(kms_emulator.endpoint)),
                   broken=source_from(config(f"http://127.0.0.1:{closed_port()}")),
                   broken_error=BackendUnavailableError, key_class="kms", places=None)


PKCS11_TOKEN = "keyseal-contract-ca"


@pytest.fixture(scope="session")
def contract_token(softhsm: SoftHsm) -> str:
    return softhsm.init_token(PKCS11_TOKEN)


@custody(slow=True)
def pkcs11_custody(tmp_path: Path, softhsm: SoftHsm, contract_token: str) -> Iterator[Custody]:
    """Key pairs in a SoftHSM2 token under a label prefix of this test's own; broken: a wrong PIN."""
    from keyseal._internal.providers.pkcs11 import session as pkcs11_session

    pins = {}
    for name, pin in (("pin", USER_PIN), ("wrong-pin", "0000-wrong")):
        pins[name] = tmp_path / name
        pins[name].write_text(pin + "\n")
    prefix = f"contract/{uuid.uuid4().hex[:8]}/"

    def config(pin: Path) -> dict[str, Any]:
        return base_config(tmp_path, custody="pkcs11", **KEY_TYPES,
                           pkcs11={"uri": f"pkcs11:token={contract_token}", "modulePath": softhsm.module,
                                   "pinFile": str(pin), "labelPrefix": prefix})

    yield Custody(source=source_from(config(pins["pin"])), broken=source_from(config(pins["wrong-pin"])),
                  broken_error=AccessDeniedError, key_class="pkcs11", places=None)
    pkcs11_session.close_all_sessions()  # sources keep their keys' sessions open, as a server does


@pytest.fixture(params=CUSTODIES)  # after every @custody: pytest copies the list
def ca(request: pytest.FixtureRequest) -> Custody:
    found: Custody = request.getfixturevalue(request.param)
    return found


# -- independent checks -------------------------------------------------------------------------------------------


def spki(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_key(key: CaKey, kind: str, key_class: str) -> None:
    """The configured type; a digest signature, a certificate and a JWS that verify with the public key."""
    public = key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == CURVES[kind], kind
    assert key.custody == key_class
    digest = hashlib.new(key.hash_name, f"contract {kind}".encode()).digest()
    prehashed = utils.Prehashed(hash_algorithm(key.hash_name))
    public.verify(key.sign_digest(digest, key.hash_name), digest, ec.ECDSA(prehashed))

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"contract {kind}")])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
                   .serial_number(x509.random_serial_number()).not_valid_before(START)
                   .not_valid_after(START + DAY).sign(key.builder_key(), hash_algorithm(key.hash_name)))
    certificate.verify_directly_issued_by(certificate)

    signing_input = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjb250cmFjdCJ9"
    raw = jws_signature(key, signing_input)
    size = (public.curve.key_size + 7) // 8
    assert len(raw) == 2 * size  # JWS ECDSA: fixed-length r || s
    der = utils.encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
    public.verify(der, signing_input, ec.ECDSA(hash_algorithm(jws_hash_name(public))))


def keys_of(keyset: KeysetKeys) -> tuple[bytes, bytes]:
    return spki(keyset.x509_key.public_key()), spki(keyset.jwt_key.public_key())


# -- the contract -------------------------------------------------------------------------------------------------


def test_an_empty_custody_starts_and_holds_no_keyset(ca: Custody) -> None:
    source = ca.source()
    assert source.describe()
    source.startup_check()
    loaded = source.load(START - DAY)
    assert loaded.keysets == () and loaded.highest == 0


def test_an_unusable_custody_fails_its_startup_check_and_writes_nothing(ca: Custody) -> None:
    with pytest.raises(ca.broken_error) as caught:
        ca.broken().startup_check()
    message = str(caught.value)
    assert message and "\n" not in message
    loaded = ca.source().load(START - DAY)
    assert loaded.keysets == () and loaded.highest == 0


def test_a_created_keyset_loads_and_its_keys_sign(ca: Custody) -> None:
    source = ca.source()
    source.startup_check()
    assert source.create(1, START, START - DAY) is True
    loaded = source.load(START - DAY)
    assert [k.number for k in loaded.keysets] == [1] and loaded.highest == 1
    keyset = loaded.keysets[0]
    assert keyset.not_before == START
    check_key(keyset.x509_key, "x509", ca.key_class)
    check_key(keyset.jwt_key, "jwt", ca.key_class)
    assert keys_of(keyset)[0] != keys_of(keyset)[1]
    again = source.load(START - DAY)
    assert again.keysets[0].x509_key is keyset.x509_key and again.keysets[0].jwt_key is keyset.jwt_key


def test_another_source_loads_the_same_keyset_and_cannot_create_it_again(ca: Custody) -> None:
    first = ca.source()
    first.startup_check()
    assert first.create(1, START, START - DAY) is True
    made = first.load(START - DAY).keysets[0]

    second = ca.source()  # another replica, or this one restarted
    second.startup_check()
    seen = second.load(START - DAY)
    assert [(k.number, k.not_before, keys_of(k)) for k in seen.keysets] == [(1, START, keys_of(made))]
    digest = hashlib.sha384(b"from the other replica").digest()
    public = made.x509_key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(seen.keysets[0].x509_key.sign_digest(digest, "sha384"), digest,
                  ec.ECDSA(utils.Prehashed(hash_algorithm("sha384"))))
    assert second.create(1, START + HOUR, START + HOUR - DAY) is False
    for source in (first, second, ca.source()):
        after = source.load(START - DAY)
        assert [(k.number, k.not_before, keys_of(k)) for k in after.keysets] == [(1, START, keys_of(made))]
        assert after.highest == 1


def test_load_returns_live_keysets_in_order_and_the_highest_number(ca: Custody) -> None:
    source = ca.source()
    source.startup_check()
    times = {1: START, 2: START + 12 * HOUR, 3: START + 24 * HOUR}
    for number, not_before in times.items():
        assert source.create(number, not_before, not_before - DAY) is True
    everything = source.load(START - HOUR)
    assert [(k.number, k.not_before) for k in everything.keysets] == list(times.items())
    assert len({key for k in everything.keysets for key in keys_of(k)}) == 6  # six different keys
    for reader in (source, ca.source()):
        assert [k.number for k in reader.load(START).keysets] == [2, 3]  # not_before == live_after: expired
        assert reader.load(START).highest == 3
        expired = reader.load(START + 24 * HOUR)
        assert expired.keysets == () and expired.highest == 3
    live = source.load(START + HOUR)  # a reload after expiry keeps what is still live
    assert [keys_of(k) for k in live.keysets] == [keys_of(k) for k in everything.keysets[1:]]


def test_a_place_held_by_a_live_keyset_is_busy(ca: Custody) -> None:
    """Keysets created an hour apart, all live: the custody holds `places` of them at once (then SlotBusyError
    until the oldest has expired), or every one when it has no places."""
    source = ca.source()
    source.startup_check()
    count = (ca.places or SLOTS) + 1
    live_after = START - DAY  # all of them are live
    for number in range(1, count):
        assert source.create(number, START + number * HOUR, live_after) is True
    if ca.places is None:
        assert source.create(count, START + count * HOUR, live_after) is True
        assert [k.number for k in source.load(live_after).keysets] == list(range(1, count + 1))
        return
    with pytest.raises(SlotBusyError) as caught:
        source.create(count, START + count * HOUR, live_after)
    assert "\n" not in str(caught.value)
    assert [k.number for k in source.load(live_after).keysets] == list(range(1, count))
    oldest_gone = START + HOUR  # keyset 1 (not_before START + 1h) has expired: its place is free
    assert source.create(count, START + count * HOUR, oldest_gone) is True
    loaded = source.load(oldest_gone)
    assert [k.number for k in loaded.keysets] == list(range(2, count + 1)) and loaded.highest == count
