"""`keyseal dev`: a local trust domain (server, agent, an entry for you) in one command (keyseal.dev)."""

from __future__ import annotations

import threading
from pathlib import Path

import click

from keyseal._internal.cli.common import json_option

__all__ = ["dev"]


@click.command("dev")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep the configuration, keys and socket here, and reuse them next time (default: a new "
                   "temporary directory, removed on exit).")
@click.option("--trust-domain", default="example.org", show_default=True, help="The SPIFFE trust domain.")
@click.option("--check", is_flag=True,
              help="Exit once an X.509-SVID and a JWT-SVID were fetched (a smoke test) instead of running until "
                   "Ctrl-C.")
@json_option
@click.pass_context
def dev(ctx: click.Context, directory: Path | None, trust_domain: str, check: bool, as_json: bool) -> None:
    """Run a whole trust domain on this machine: server, agent and an entry for you, on 127.0.0.1 only."""
    from keyseal._internal.cli.dev_domain import DevReport, run_dev
    from keyseal._internal.cli.output import print_json, print_labelled
    from keyseal._internal.cli.service import on_stop_signals
    from keyseal._internal.spiffe.ids import check_trust_domain

    check_trust_domain(trust_domain)
    stop = threading.Event()
    if not check:
        on_stop_signals("keyseal.dev", stop.set)

    def show(report: DevReport) -> None:
        if as_json:
            print_json({**report.to_json(), "check": "passed" if check else "running"})
            return
        last = (("check", "passed: server, agent and py-spiffe fetched an X.509-SVID and a JWT-SVID") if check
                else ("running", "until Ctrl-C (the log is in dev.log in the directory)"))
        print_labelled([*report.fields(), last])

    verbose = bool(ctx.find_root().params.get("verbose"))
    run_dev(directory, trust_domain, check, stop, show, verbose)
    if not check and not as_json:
        print_labelled([("stopped", "server and agent")])
