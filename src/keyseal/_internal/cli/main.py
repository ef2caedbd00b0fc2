"""The command group (click): every command, lazily imported. `keyseal` starts in cli.quick, which runs
the fast paths itself and hands the rest to `main` here."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, NoReturn

import click

from keyseal._internal.cli.commands import COMMANDS, GROUP_HELP, QUIET_HELP, SHORT_HELP, VERBOSE_HELP
from keyseal._internal.cli.guard import fail, run_guarded, show_causes
from keyseal._version import __version__

__all__ = ["LazyGroup", "cli", "main"]

# The table lives in cli.commands, which `keyseal --help` reads without click (cli.fasthelp).
_COMMANDS = COMMANDS
_SHORT_HELP = SHORT_HELP


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


@click.group(cls=LazyGroup, help=GROUP_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="keyseal")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
def cli(verbose: bool, quiet: bool) -> None:
    """The group: log level and progress bars for every command (its help is GROUP_HELP)."""
    if verbose:
        show_causes()  # an error line is followed by its causes, as with KEYSEAL_DEBUG=1
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
