"""Signatures per second through keyseal's pkcs11: backend against raw python-pkcs11 calls on the same token.

A throwaway SoftHSM2 token is made under a temporary SOFTHSM2_CONF; for each key type the same private key object
signs the same digests, once through `key.sign()` directly (the raw rate: one C_Sign per call, nothing else) and
once through `Signer.sign_digest()` (DigestInfo prefix, lock, DER conversion). Target: ratio >= 0.8.

Usage: python benchmarks/pkcs11_sign.py [--signatures 2000] [--rounds 3] [--threads 4]
Each figure is the best of N rounds; raw and keyseal rounds alternate.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "bench-pin-1234"
TOKEN = "keyseal-bench"
KEY_TYPES = ("p256", "ed25519", "rsa2048")


def setup_token(work: Path) -> None:
    (work / "tokens").mkdir()
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {work / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # before the module is loaded: SoftHSM reads it once
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--so-pin", "so-" + PIN,
                    "--pin", PIN], check=True, capture_output=True)


def rate(count: int, threads: int, sign: Callable[[bytes], object]) -> float:
    digests = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(count)]
    chunks = [digests[i::threads] for i in range(threads)]

    def work(chunk: list[bytes]) -> None:
        for digest in chunk:
            sign(digest)

    workers = [threading.Thread(target=work, args=(chunk,)) for chunk in chunks]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--signatures", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    if not os.path.exists(MODULE) or not shutil.which("softhsm2-util"):
        sys.exit("SoftHSM2 is required (Debian package softhsm2)")
    work = Path(tempfile.mkdtemp(prefix="keyseal-p11-bench-"))
    try:
        setup_token(work)
        run(args.signatures, args.rounds, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(count: int, rounds: int, threads: int) -> None:
    import pkcs11

    from keyseal.backends import open_signer
    from keyseal.backends.pkcs11 import create_key

    os.environ["KEYSEAL_PKCS11_PIN"] = PIN
    prefix = bytes.fromhex("3031300d060960864801650304020105000420")  # SHA-256 DigestInfo, as keyseal adds
    mechanisms = {"p256": pkcs11.Mechanism.ECDSA, "ed25519": pkcs11.Mechanism.EDDSA,
                  "rsa2048": pkcs11.Mechanism.RSA_PKCS}
    print(f"{'key':8} {'threads':>7} {'raw sig/s':>10} {'keyseal sig/s':>14} {'ratio':>6}")
    for key_type in KEY_TYPES:
        label = f"bench-{key_type}"
        uri = f"pkcs11:token={TOKEN};object={label}?module-path={MODULE}"
        create_key(uri, key_type)
        with open_signer(uri) as signer:
            # The raw baseline: a second session on the same token and key (the login is shared by the
            # application), C_Sign on the bare digest (RSA: the same DigestInfo prefix keyseal adds).
            token = pkcs11.lib(MODULE).get_token(token_label=TOKEN)
            with token.open() as session:
                key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=label)
                mechanism = mechanisms[key_type]
                extra = prefix if key_type.startswith("rsa") else b""

                def raw_sign(digest: bytes, key: Any = key, extra: bytes = extra,
                             mechanism: Any = mechanism) -> object:
                    return key.sign(extra + digest, mechanism=mechanism)

                def keyseal_sign(digest: bytes, signer: Any = signer) -> object:
                    return signer.sign_digest(digest, "sha256")

                for n_threads in (1, threads):
                    raw_best = keyseal_best = 0.0
                    for _ in range(rounds):  # interleaved, so load from elsewhere hits both alike
                        raw_best = max(raw_best, rate(count, n_threads, raw_sign))
                        keyseal_best = max(keyseal_best, rate(count, n_threads, keyseal_sign))
                    print(f"{key_type:8} {n_threads:>7} {raw_best:>10.0f} {keyseal_best:>14.0f} "
                          f"{keyseal_best / raw_best:>6.2f}")


if __name__ == "__main__":
    main()
