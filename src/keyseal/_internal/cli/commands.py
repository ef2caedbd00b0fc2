"""The command table: what `keyseal --help` shows, without click or any command module (keyseal._internal.cli.fasthelp
renders it; keyseal._internal.cli.main builds the click group from the same table; tests/test_startup.py holds the two
renderings equal)."""

from __future__ import annotations

__all__ = ["COMMANDS", "GROUP_HELP", "QUIET_HELP", "SHORT_HELP", "VERBOSE_HELP"]

GROUP_HELP = "keyseal: sign with keys that cannot be stolen (KMS, HSM, or envelope-wrapped)."
VERBOSE_HELP = "Log what keyseal does (never key material)."
QUIET_HELP = "No progress bars (they are shown only on a terminal anyway)."

# name -> "module:attribute"; imported only when the command runs, so `keyseal verify` never loads boto3.
COMMANDS: dict[str, str] = {
    "keys": "keyseal._internal.cli.keys:keys",
    "sign": "keyseal._internal.cli.sign:sign",
    "verify": "keyseal._internal.cli.verify:verify",
    "iam-policy": "keyseal._internal.cli.iam:iam_policy",
    "vault-policy": "keyseal._internal.cli.vault:vault_policy",
    "checksums": "keyseal._internal.cli.release:checksums",
    "verify-release": "keyseal._internal.cli.release:verify_release_command",
    "wkd": "keyseal._internal.cli.wkd:wkd",
    "server": "keyseal._internal.cli.server:server",
    "entry": "keyseal._internal.cli.entry:entry",
    "federation": "keyseal._internal.cli.federation:federation",
    "agent": "keyseal._internal.cli.agent:agent",
    "bundle": "keyseal._internal.cli.bundle:bundle",
    "dev": "keyseal._internal.cli.dev:dev",
    "git-setup": "keyseal._internal.cli.gitsetup:git_setup",
    "audit": "keyseal._internal.cli.audit:audit",
    "signatures": "keyseal._internal.cli.signatures:signatures",
}


# name -> the first paragraph of the command's help, which `keyseal --help` lists without importing the command
# (tests/test_startup.py holds each to the command's own help).
SHORT_HELP: dict[str, str] = {
    "agent": "Run the node agent: join the trust-domain server and serve SVIDs to local workloads.",
    "audit": "The audit log: one hash-chained line per signature keyseal made, with signed checkpoints.",
    "bundle": "Fetch a trust-domain server's trust bundle, pinned by the CA fingerprint it printed at start-up.",
    "checksums": "Write a checksum manifest (`<hex>  <name>` lines, names without directories), then sign it "
                 "with `keyseal sign`.",
    "dev": "Run a whole trust domain on this machine: server, agent and an entry for you, on 127.0.0.1 only.",
    "entry": "Registration entries (selectors -> SPIFFE ID) for node agents, and agent join tokens.",
    "federation": "Show the federated trust bundles a running server holds, and when each was last refreshed.",
    "git-setup": "Register a key for git signing and print (or --apply) the git config that uses it.",
    "iam-policy": "Print the IAM policy JSON that allows exactly what keyseal needs.",
    "keys": "Create keys and mint their OpenPGP certificates.",
    "server": "Run the SPIFFE trust-domain server: X.509-SVIDs, JWT-SVIDs and the trust bundle over HTTPS.",
    "sign": "Write detached signatures: OpenPGP (gpg and sqv verify them), SSH or minisign; or cleartext signed "
            "OpenPGP messages (--clear).",
    "signatures": "Work with detached OpenPGP signature files.",
    "vault-policy": "Print the Vault policy (HCL) that allows exactly what keyseal needs on that key.",
    "verify": "Exit 0 and print the signer's fingerprint if FILE carries a valid signature from one of the "
              "certificates.",
    "verify-release": "Verify the manifest's signature, then every ARTIFACT against the manifest. Exit 0 only if "
                      "all pass.",
    "wkd": "Publish release keys in a Web Key Directory, and look keys up in one.",
}
