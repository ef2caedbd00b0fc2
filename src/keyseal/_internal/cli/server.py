"""`keyseal server --config FILE`: run the SPIFFE trust-domain server (docs/server-api.md)."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import click

from keyseal.errors import UsageError

__all__ = ["EXAMPLES", "example_config", "server"]

# --print-config NAME -> the commented starting file in keyseal/ca/examples (the same files as examples/).
EXAMPLES = ("local", "awskms", "kms", "pkcs11", "vault")


def example_config(name: str) -> str:
    from importlib.resources import files

    return files("keyseal._internal.ca").joinpath("examples", f"server-{name}.yaml").read_text(encoding="utf-8")


@click.command("server")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="YAML configuration; its keys mirror the Helm chart's values.")
@click.option("--print-config", "print_config", type=click.Choice(EXAMPLES), is_flag=False, flag_value="local",
              default=None, help="Print a commented starting configuration (default: local; or awskms, kms, "
                                 "pkcs11, vault) and exit.")
def server(config_path: Path | None, print_config: str | None) -> None:
    """Run the SPIFFE trust-domain server: X.509-SVIDs, JWT-SVIDs and the trust bundle over HTTPS."""
    if print_config is not None:
        click.echo(example_config(print_config), nl=False)
        return
    if config_path is None:
        raise UsageError("give --config FILE (keyseal server --print-config > server.yaml writes a starting file; "
                         "keyseal dev runs a local trust domain without one)")
    from keyseal._internal.ca.config import load_config
    from keyseal._internal.ca.server import CaServer
    from keyseal._internal.cli.service import configure_logging, on_stop_signals

    config = load_config(config_path)
    configure_logging(config.log_level)
    instance = CaServer(config)
    instance.start()

    on_stop_signals("keyseal._internal.ca.server",
                    lambda: threading.Thread(target=instance.shutdown, daemon=True).start())
    # What start-up made (modules, SDKs, keysets) lives as long as this process: keep it out of the cyclic
    # garbage collector's passes, which would otherwise walk all of it again and again while SVIDs are issued
    # (about a tenth of an SVID's server time, benchmarks/README.md). A process-wide choice, so it is made here
    # and not in CaServer, which a program may embed.
    gc.freeze()
    instance.serve_forever()
