"""Entry point: the command group, and the one place where errors become a single stderr line."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, NoReturn

import click

from keyseal import __version__
from keyseal.errors import KeysealError, unexpected

# name -> "module:attribute"; imported only when the command runs, so `keyseal verify` never loads boto3.
_COMMANDS: dict[str, str] = {
    "keys": "keyseal.cli.keys:keys",
    "sign": "keyseal.cli.sign:sign",
    "verify": "keyseal.cli.verify:verify",
    "iam-policy": "keyseal.cli.iam:iam_policy",
    "vault-policy": "keyseal.cli.vault:vault_policy",
    "checksums": "keyseal.cli.release:checksums",
    "verify-release": "keyseal.cli.release:verify_release_command",
    "wkd": "keyseal.cli.wkd:wkd",
    "server": "keyseal.cli.server:server",
    "entry": "keyseal.cli.entry:entry",
    "agent": "keyseal.cli.agent:agent",
    "git-setup": "keyseal.cli.gitsetup:git_setup",
    "audit": "keyseal.cli.audit:audit",
    "signatures": "keyseal.cli.signatures:signatures",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(_COMMANDS) | set(super().list_commands(ctx)))

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
def cli(verbose: bool) -> None:
    """keyseal: sign with keys that cannot be stolen (KMS, HSM, or envelope-wrapped)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="keyseal: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"keyseal: error: {message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every expected failure is one line on stderr and a non-zero exit."""
    try:
        rv: Any = cli.main(args=argv, prog_name="keyseal", standalone_mode=False)
    except KeysealError as exc:
        _fail(exc.message, exc.exit_code)
    except click.ClickException as exc:
        _fail(" ".join(exc.format_message().split()), exc.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(141)
    except Exception as exc:
        if os.environ.get("KEYSEAL_DEBUG"):
            raise
        _fail(unexpected(exc), 70)
    sys.exit(rv if isinstance(rv, int) else 0)
