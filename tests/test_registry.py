"""The one registry shape (keyseal._internal.registry): another package registers a signer scheme or a KEK through
a real entry point (an installed distribution's `entry_points.txt`, found by importlib.metadata on sys.path) and
keyseal opens it by its name; built-ins win a name clash; unknown names get one line listing the known ones."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyseal._internal.backends import open_signer
from keyseal._internal.registry import CUSTODIES, KEKS, SIGNERS, Registry
from keyseal._internal.wrapping.kek import parse_kek
from keyseal._internal.wrapping.provider import new_dek
from keyseal.errors import KeysealError, KeyURIError, UsageError

PLUGIN = '''
"""A signer and a KEK from outside keyseal, registered only through entry points."""
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyseal._internal.wrapping.local import LocalKek
from keyseal.signer import Signer

OPENED = []


class SeedSigner(Signer):
    def __init__(self, uri: str, seed: bytes) -> None:
        self.uri = uri
        self._key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)

    def public_key(self):
        return self._key.public_key()

    def supported_hashes(self):
        return ("sha256",)

    def sign_digest(self, digest, hash_name):
        return self._key.sign(digest)


def open_signer(uri, rest, options):
    OPENED.append(uri)
    return SeedSigner(uri, bytes.fromhex(rest))


class PluginKek(LocalKek):
    provider = "plugkek"


def open_kek(spec, rest, options):
    from pathlib import Path

    return PluginKek(Path(rest))
'''


def install(site: Path, dist: str, entry_points: str, module: str | None = None) -> None:
    """A distribution as pip leaves it: `<dist>-1.0.dist-info/{METADATA,entry_points.txt}` (+ its module)."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    if module is not None:
        (site / f"{dist}.py").write_text(module)


def forget_entry_points() -> None:
    for registry in (SIGNERS, KEKS, CUSTODIES):
        registry.refresh()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    """A site directory on sys.path for the test's distributions; gone (and forgotten) afterwards."""
    path = tmp_path / "site"
    path.mkdir()
    sys.path.insert(0, str(path))
    forget_entry_points()
    yield path
    sys.path.remove(str(path))
    sys.modules.pop("keyseal_testplugin", None)
    forget_entry_points()


def test_signer_scheme_from_an_entry_point(site: Path) -> None:
    install(site, "keyseal_testplugin", "[keyseal.signers]\nseedkey = keyseal_testplugin:open_signer\n", PLUGIN)
    assert "seedkey" in SIGNERS.names()
    seed = bytes(range(32))
    digest = hashlib.sha256(b"signed by a plugin").digest()
    with open_signer(f"seedkey:{seed.hex()}") as signer:
        signature = signer.sign_digest(digest, "sha256")
    ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().verify(signature, digest)  # raises if not
    opened = sys.modules["keyseal_testplugin"].OPENED
    assert opened == [f"seedkey:{seed.hex()}"]


def test_kek_from_an_entry_point(site: Path, tmp_path: Path) -> None:
    install(site, "keyseal_testplugin", "[keyseal.keks]\nplugkek = keyseal_testplugin:open_kek\n", PLUGIN)
    kek = parse_kek(f"plugkek:{tmp_path / 'kek'}")
    assert type(kek).__name__ == "PluginKek" and kek.provider == "plugkek"
    dek = new_dek()
    context = {"keyseal:record": "r"}
    assert kek.unwrap(kek.wrap(dek, context), context, "r") == dek


def test_unknown_names_list_the_known_ones(site: Path) -> None:
    install(site, "keyseal_testplugin", "[keyseal.signers]\nseedkey = keyseal_testplugin:open_signer\n", PLUGIN)
    with pytest.raises(KeyURIError) as exc:
        open_signer("gcpkms:projects/p/keys/k")
    assert str(exc.value) == ("unknown key URI scheme 'gcpkms': use one of awskms, file, hashivault, pkcs11, "
                              "seedkey, vault")
    with pytest.raises(UsageError) as kek_exc:
        parse_kek("gcpkms:x")
    assert "\n" not in str(kek_exc.value) and str(kek_exc.value).startswith("invalid KEK 'gcpkms:x': use local")
    with pytest.raises(UsageError) as custody_exc:
        CUSTODIES.load("hsm9000")
    assert str(custody_exc.value) == "unknown custody 'hsm9000': use one of kms, pkcs11, wrapped"


def test_builtins_win_a_clash(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Installing a package never changes what a built-in scheme means: its entry point is ignored, and said."""
    install(site, "keyseal_testplugin", "[keyseal.signers]\nfile = keyseal_testplugin:open_signer\n", PLUGIN)
    from keyseal._internal.backends import file as file_backend

    with caplog.at_level(logging.WARNING, logger="keyseal._internal.registry"):
        assert SIGNERS.load("file") is file_backend.open
        assert SIGNERS.names().count("file") == 1
    assert any("keyseal_testplugin" in r.getMessage() and "built-in" in r.getMessage() for r in caplog.records)
    assert "keyseal_testplugin" not in sys.modules


def test_a_name_differing_from_a_builtin_only_by_case_is_ignored(site: Path) -> None:
    """`AWSKMS:` is a user's typing mistake for `awskms:`, not another package's scheme to answer."""
    install(site, "keyseal_testplugin", "[keyseal.signers]\nAWSKMS = keyseal_testplugin:open_signer\n", PLUGIN)
    assert "AWSKMS" not in SIGNERS.names()
    with pytest.raises(KeysealError) as raised:
        SIGNERS.load("AWSKMS")
    assert "unknown" in str(raised.value)
    assert "keyseal_testplugin" not in sys.modules


def test_two_packages_for_one_name_are_refused(site: Path) -> None:
    install(site, "keyseal_testplugin", "[keyseal.signers]\nseedkey = keyseal_testplugin:open_signer\n", PLUGIN)
    install(site, "keyseal_otherplugin", "[keyseal.signers]\nseedkey = keyseal_testplugin:open_signer\n")
    with pytest.raises(UsageError) as exc:
        open_signer("seedkey:00")
    assert str(exc.value) == ("the key URI scheme 'seedkey' is registered by several packages (keyseal_otherplugin, "
                              "keyseal_testplugin): uninstall all but one")


def test_a_broken_plugin_is_one_line(site: Path) -> None:
    install(site, "keyseal_testplugin", "[keyseal.signers]\nbroken = keyseal_testplugin:no_such_function\n",
            PLUGIN)
    with pytest.raises(UsageError) as exc:
        open_signer("broken:x")
    message = str(exc.value)
    assert "\n" not in message and message.startswith("cannot load the key URI scheme 'broken' from keyseal_testplugin")


def test_builtins_are_imported_on_first_use() -> None:
    """The KEK contract imports no provider (no kek <-> provider cycle), and a registry imports nothing until a
    name is used: parsing a local KEK loads neither boto3 nor hvac."""
    code = (
        "import sys\n"
        "import keyseal._internal.wrapping.kek, keyseal._internal.wrapping.provider, keyseal._internal.backends\n"
        "providers = ['keyseal._internal.wrapping.local', 'keyseal._internal.wrapping.awskms',\n"
        "             'keyseal._internal.wrapping.vault', 'keyseal._internal.backends.file']\n"
        "assert not [m for m in providers if m in sys.modules], [m for m in providers if m in sys.modules]\n"
        "from keyseal._internal.wrapping.kek import parse_kek\n"
        "parse_kek('local:/nonexistent/kek')\n"
        "assert 'keyseal._internal.wrapping.local' in sys.modules\n"
        "assert not [m for m in ('boto3', 'hvac', 'keyseal._internal.wrapping.awskms') if m in sys.modules]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_registry_caches_what_it_loaded() -> None:
    registry = Registry("thing", "keyseal.test-nothing", {"ed": "cryptography.hazmat.primitives.asymmetric.ed25519:"
                                                               "Ed25519PrivateKey"})
    assert registry.load("ed") is ed25519.Ed25519PrivateKey is registry.load("ed")
    assert registry.names() == ("ed",) and "ed" in registry and "other" not in registry


def test_custody_names_in_the_configuration(site: Path) -> None:
    """`custody:` takes the names another package registers; an unknown one lists every known name."""
    from keyseal._internal.ca.config import parse_config

    install(site, "keyseal_testplugin", "[keyseal.custodies]\nvaultpki = keyseal_testplugin:open_signer\n", PLUGIN)
    assert parse_config({"trustDomain": "example.org", "custody": "vaultpki"}).custody == "vaultpki"
    with pytest.raises(UsageError) as exc:
        parse_config({"trustDomain": "example.org", "custody": "hsm9000"})
    assert str(exc.value) == "custody='hsm9000' is not one of wrapped, kms, pkcs11, vaultpki"
