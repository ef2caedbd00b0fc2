"""The command group (click): every command, lazily imported. `keyseal` starts in cli.quick, which runs
the fast paths itself and hands the rest to `main` here."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, NoReturn

import click

from keyseal._internal.cli.quick import fail, run_guarded
from keyseal._version import __version__

# name -> "module:attribute"; imported only when the command runs, so `keyseal verify` never loads boto3.
_COMMANDS: dict[str, str] = {
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
_SHORT_HELP: dict[str, str] = {
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


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use; its help lists them from `_SHORT_HELP`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(_COMMANDS) | set(super().list_commands(ctx)))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's own listing, with the short help of lazy commands taken from the table (shortened by click's
        own rule, through a stand-in command that carries only that help)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            if name in _SHORT_HELP:
                rows.append((name, click.Command(name, help=_SHORT_HELP[name]).get_short_help_str(limit)))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = target.split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attribute)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="keyseal")
@click.option("-v", "--verbose", is_flag=True, help="Log what keyseal does (never key material).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (they are shown only on a terminal anyway).")
def cli(verbose: bool, quiet: bool) -> None:
    """keyseal: sign with keys that cannot be stolen (KMS, HSM, or envelope-wrapped)."""
    if quiet:
        from keyseal._internal.progress import set_quiet

        set_quiet(True)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="keyseal: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the click group; every expected failure is one line on stderr and a non-zero exit. The `keyseal`
    command starts in keyseal._internal.cli.quick, which comes here for all but the fast paths."""

    def run() -> Any:
        try:
            return cli.main(args=argv, prog_name="keyseal", standalone_mode=False)
        except click.ClickException as exc:
            fail(" ".join(exc.format_message().split()), exc.exit_code)
        except click.exceptions.Abort:
            fail("aborted", 130)

    run_guarded(run)
