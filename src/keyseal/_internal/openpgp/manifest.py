"""Checksum manifests (`SHA256SUMS`): written in the coreutils / GoReleaser format, read back strictly.

A manifest is signed like any file; its signature is checked over its raw bytes before a single line is parsed,
so the parser only ever sees what the release key signed. Parsing is still strict (a malformed line or a file
listed twice is an error) because a lenient parser and a strict one can disagree about what a signed manifest
says. "Twice" means as `sha256sum -c` reads the names, as paths: `f`, `./f`, `a/../f` and `a//f`... name one file,
so a manifest listing two of them is refused (coreutils checks both lines against that file; keyseal would pick
one). `..` is resolved by the name alone, so `link/../f` counts as `f` even where `link` is a symbolic link: such
a manifest is refused, never read two ways. Case and Unicode normalisation are not folded: on a file system that
folds them, two such names can be one file. Artifacts are hashed as streams and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from keyseal._internal.filehash import feed_file
from keyseal.errors import UsageError, VerificationError

__all__ = [
    "DIGESTS",
    "MAX_MANIFEST_BYTES",
    "CheckedArtifact",
    "Entry",
    "Manifest",
    "build_manifest",
    "check_artifacts",
    "check_name",
    "digest_file",
    "entry_for",
    "names_directory",
    "parse_manifest",
    "path_key",
]

# Digest name -> hex length. The manifest's digest follows from its line length (all lines must agree).
DIGESTS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128}
_LABELS = {"sha256": "SHA-256", "sha384": "SHA-384", "sha512": "SHA-512"}
_LINE = re.compile(r"^(?P<hex>[0-9a-fA-F]+) (?P<mode>[ *])(?P<name>.+)$")
MAX_MANIFEST_BYTES = 16 << 20


@dataclass(frozen=True)
class Entry:
    """One manifest line: the artifact's name and its digest."""

    name: str
    digest: bytes


def path_key(name: str) -> str:
    """The file a manifest name denotes, by the name alone: repeated slashes, `.` and `dir/..` removed (what the
    kernel does when `sha256sum -c` opens it, symbolic links aside). Two names with one key are one file."""
    key = posixpath.normpath(name)
    return key[1:] if key.startswith("//") else key  # POSIX leaves a leading `//` open; Linux reads it as `/`


def names_directory(name: str) -> bool:
    """A name that can only be a directory (`d/`, `.`, `d/..`): never a file a manifest can check."""
    return name.rsplit("/", 1)[-1] in ("", ".", "..")


@dataclass(frozen=True)
class Manifest:
    digest_name: str
    entries: tuple[Entry, ...]
    _by_path: dict[str, Entry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_path: dict[str, Entry] = {}
        for entry in self.entries:
            by_path.setdefault(path_key(entry.name), entry)
        object.__setattr__(self, "_by_path", by_path)

    def lookup(self, name: str) -> Entry | None:
        """The entry for a path, however either spells it (`dist/f` finds `./dist/f`)."""
        return self._by_path.get(path_key(name))


def digest_file(path: Path, digest_name: str) -> bytes:
    """The digest of a file, read in fixed-size chunks (a release of any size costs a fixed buffer)."""
    hasher = hashlib.new(digest_name)
    feed_file(path, [hasher])
    return hasher.digest()


def check_name(name: str) -> str:
    """A name a manifest line can carry unambiguously: no line breaks, backslashes or control characters."""
    if not name or any(ch in name for ch in "\\\r\n") or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise UsageError(f"cannot list {name!r} in a checksum manifest: its name holds a line break, a backslash "
                         f"or a control character; rename the file")
    return name


def build_manifest(paths: Sequence[Path], digest_name: str = "sha256") -> bytes:
    """`<hex>  <name>` lines, one per file, named by the file's base name (as GoReleaser writes them)."""
    if digest_name not in DIGESTS:
        raise UsageError(f"unknown digest {digest_name!r}: use {', '.join(DIGESTS)}")
    seen: dict[str, Path] = {}
    for path in paths:
        name = check_name(path.name)
        if name in seen:
            raise UsageError(f"{seen[name]} and {path} have the same name {name!r}: a manifest lists names once")
        seen[name] = path
    lines = [f"{digest_file(path, digest_name).hex()}  {name}\n" for name, path in seen.items()]
    return "".join(lines).encode("utf-8")


def parse_manifest(data: bytes, source: str = "manifest") -> Manifest:
    """Parse a manifest strictly: every line `<hex>  <name>` (or `<hex> *<name>`), one digest length for all,
    each name once. A final newline and CRLF line ends are accepted; anything else unexpected is an error."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise VerificationError(f"{source} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a checksum manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VerificationError(f"{source} is not UTF-8 text: not a checksum manifest") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise VerificationError(f"{source} lists no files")
    digest_name: str | None = None
    entries: list[Entry] = []
    names: dict[str, tuple[int, str]] = {}  # path_key -> (line, name as written)
    for number, raw in enumerate(lines, start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        match = _LINE.match(line)
        if match is None or "\r" in line or "\\" in match["name"]:
            raise VerificationError(f"{source} line {number} is malformed: expected '<hex digest>  <file name>'")
        length = len(match["hex"])
        kind = next((name for name, size in DIGESTS.items() if size == length), None)
        if kind is None:
            raise VerificationError(f"{source} line {number} is malformed: a {length}-digit digest is not "
                                    f"SHA-256, SHA-384 or SHA-512")
        if digest_name is None:
            digest_name = kind
        elif kind != digest_name:
            raise VerificationError(f"{source} line {number} is malformed: it mixes {_LABELS[kind]} into a "
                                    f"{_LABELS[digest_name]} manifest")
        name = match["name"]
        if names_directory(name):
            raise VerificationError(f"{source} line {number} is malformed: {name!r} names a directory, not a file")
        key = path_key(name)
        if key in names:
            first, written = names[key]
            if written == name:
                raise VerificationError(f"{source} line {number} lists {name!r} again (first on line {first}): "
                                        f"duplicate names are refused")
            raise VerificationError(f"{source} line {number} lists {name!r}, the same file as {written!r} on line "
                                    f"{first}: duplicate names are refused")
        names[key] = (number, name)
        entries.append(Entry(name, bytes.fromhex(match["hex"])))
    assert digest_name is not None
    return Manifest(digest_name, tuple(entries))


def entry_for(manifest: Manifest, artifact: Path, source: str) -> Entry:
    """The manifest line for an artifact: by the path as given, else by its base name."""
    entry = manifest.lookup(artifact.as_posix()) or manifest.lookup(artifact.name)
    if entry is None:
        raise VerificationError(f"{artifact} is not listed in {source}")
    return entry


@dataclass(frozen=True)
class CheckedArtifact:
    path: Path
    name: str


def check_artifacts(manifest: Manifest, artifacts: Iterable[Path], source: str = "manifest") -> list[CheckedArtifact]:
    """Hash each artifact and compare it with its manifest line in constant time; the first mismatch raises."""
    checked: list[CheckedArtifact] = []
    for artifact in artifacts:
        entry = entry_for(manifest, artifact, source)
        actual = digest_file(artifact, manifest.digest_name)
        if not hmac.compare_digest(actual, entry.digest):
            raise VerificationError(
                f"{artifact}: {_LABELS[manifest.digest_name]} differs from the one {source} lists for "
                f"{entry.name!r}: the file is not the one that was released"
            )
        checked.append(CheckedArtifact(artifact, entry.name))
    return checked
