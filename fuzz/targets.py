"""The fuzz targets: one per parser that reads outside input, each with the seeds that get past its first checks.

A target returns normally or raises a `KeysealError`; `run_one` turns that into "accepted" / "rejected" and
lets anything else (a crash) propagate with the input that caused it.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fuzz.corpus import DATA, NOW, Corpus, build_corpus
from fuzz.mutate import Choices, mutate
from keyseal._internal.openpgp.armor import dearmor_all, dearmor_or_binary, is_armored
from keyseal._internal.openpgp.cert import load_certificates, merge_certificates
from keyseal._internal.openpgp.keys import parse_key_packet
from keyseal._internal.openpgp.manifest import parse_manifest
from keyseal._internal.openpgp.packets import (
    TAG_PUBLIC_KEY,
    TAG_PUBLIC_SUBKEY,
    TAG_SIGNATURE,
    iter_packets,
    parse_subpackets,
)
from keyseal._internal.openpgp.signature import check_signature_math, new_hasher, parse_signature
from keyseal._internal.openpgp.trust import TrustSet, check_certificate
from keyseal._internal.openpgp.verify import parse_detached, verify_bytes
from keyseal._internal.openpgp.wkd import Address, keep_user_ids
from keyseal._internal.records.record import WrappedRecord
from keyseal._internal.wrapping.envelope import unseal
from keyseal.errors import KeysealError

Outcome = Literal["accepted", "rejected"]


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], object]
    seeds: list[bytes]
    kind: str | None = None  # the mutator for its seeds (fuzz.mutate.MUTATORS); None: guessed per seed
    pool: tuple[bytes, ...] = ()  # inputs to splice from (other certificates and signatures)

    def mutant(self, program: bytes) -> bytes:
        """The input a mutation program makes: it picks a seed, then the changes to it."""
        choices = Choices(program)
        seed = self.seeds[choices.below(len(self.seeds))]
        return mutate(seed, choices, self.pool, self.kind)


def run_one(target: Target, data: bytes) -> Outcome:
    """Feed one input; a KeysealError is a rejection, any other exception escapes (a bug)."""
    try:
        target.run(data)
    except KeysealError as exc:
        message = str(exc)
        if not message or "\n" in message:  # the CLI prints it as one line
            raise AssertionError(f"{target.name}: {type(exc).__name__} with a message that is not one line: "
                                 f"{message!r}") from None
        return "rejected"
    return "accepted"


def make_targets(corpus: Corpus) -> dict[str, Target]:
    """Every target, bound to the corpus's fixed context (trusted certificates, signed data, KEK)."""
    trusted = corpus.trusted
    all_signatures = b"".join(dearmor_or_binary(sig) for sig in corpus.signatures)
    address = Address("upstream", "example.org")
    kek = corpus.kek
    assert kek is not None

    def armor_target(data: bytes) -> None:
        is_armored(data)
        dearmor_or_binary(data)
        dearmor_all(data)

    def packets_target(data: bytes) -> None:
        for packet in iter_packets(data):
            if packet.tag == TAG_SIGNATURE:
                parse_signature(packet.body)

    def subpackets_target(data: bytes) -> None:
        parse_subpackets(data, "fuzzed subpackets")

    def key_target(data: bytes) -> None:
        key = parse_key_packet(data)
        key.describe()
        assert len(key.fingerprint_hex) == 40

    def signature_target(data: bytes) -> None:
        sig = parse_signature(data)
        _ = (sig.created, sig.expiration_seconds, sig.key_expiration_seconds, sig.key_flags,
             sig.issuer_fingerprint, sig.issuer_key_ids, sig.embedded_signatures, sig.unknown_critical())
        hasher = new_hasher(sig.hash_id)  # a refused hash is a typed error, as verify reports it
        hasher.update(DATA + sig.trailer())
        digest = hasher.digest()
        for cert in trusted:
            for entry in cert.signing_keys:
                check_signature_math(sig, entry.key.public_key, entry.key.algorithm, digest)

    def certificate_target(data: bytes) -> None:
        certificates = load_certificates(data, "fuzzed certificate")
        merged = merge_certificates(certificates + certificates)
        for cert in merged:
            check_certificate(cert, "fuzzed certificate")
        verify_bytes(merged, DATA, all_signatures, NOW)

    def detached_target(data: bytes) -> None:
        parse_detached(data)
        verify_bytes(trusted, DATA, data, NOW)

    def record_target(data: bytes) -> None:
        record = WrappedRecord.from_bytes(data, "fuzzed record")
        record.aad()
        unseal(record, kek, "fuzzed record")

    def manifest_target(data: bytes) -> None:
        manifest = parse_manifest(data, "fuzzed manifest")
        for entry in manifest.entries:
            manifest.lookup(entry.name)

    def wkd_target(data: bytes) -> None:
        for cert in merge_certificates(load_certificates(data, "fuzzed WKD answer")):
            keep_user_ids(cert, address)

    def trust_target(data: bytes) -> None:
        TrustSet.from_armored(data, source="fuzzed embedded keys")

    certificates = corpus.certificates
    pool = tuple(corpus.certificates + corpus.signatures)
    armored = [c for c in certificates + corpus.signatures if is_armored(c)]
    binary_certs = [c for c in certificates if not is_armored(c)]
    key_bodies = corpus.packet_bodies((TAG_PUBLIC_KEY, TAG_PUBLIC_SUBKEY))
    return {
        target.name: target
        for target in (
            Target("armor", armor_target, armored, "armor", pool),
            Target("packets", packets_target, corpus.binaries(), "packets", pool),
            Target("subpackets", subpackets_target, corpus.subpacket_areas(), "subpackets", pool),
            Target("key_packet", key_target, key_bodies, "key", pool),
            Target("signature", signature_target, corpus.packet_bodies((TAG_SIGNATURE,)), "signature", pool),
            Target("certificate", certificate_target, certificates, None, pool),
            Target("detached", detached_target, corpus.signatures, None, pool),
            Target("record", record_target, corpus.records, "record", pool),
            Target("manifest", manifest_target, corpus.manifests, "manifest", pool),
            Target("wkd_answer", wkd_target, binary_certs, "packets", pool),
            Target("trust_set", trust_target, certificates, None, pool),
        )
    }


@functools.cache
def shared_corpus() -> Corpus:
    """One corpus per process (it runs gpg and makes RSA keys). Its work directory (gpg's home, the local KEK
    file) is removed as soon as the seeds are made: the KEK stays loaded in memory, which is all unseal needs."""
    workdir = Path(tempfile.mkdtemp(prefix="keyseal-fuzz-"))
    try:
        corpus = build_corpus(workdir)
        assert corpus.kek is not None
        corpus.kek.kek_id  # noqa: B018 - loads the KEK before its file goes
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return corpus


@functools.cache
def shared_targets() -> dict[str, Target]:
    return make_targets(shared_corpus())
