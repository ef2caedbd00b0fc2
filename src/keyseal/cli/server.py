"""`keyseal server --config FILE`: run the SPIFFE trust-domain server (docs/server-api.md)."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import click

__all__ = ["server"]


@click.command("server")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="YAML configuration; its keys mirror the Helm chart's values.")
def server(config_path: Path) -> None:
    """Run the SPIFFE trust-domain server: X.509-SVIDs, JWT-SVIDs and the trust bundle over HTTPS."""
    from keyseal.ca.config import load_config
    from keyseal.ca.server import CaServer
    from keyseal.cli.service import configure_logging, on_stop_signals

    config = load_config(config_path)
    configure_logging(config.log_level)
    instance = CaServer(config)
    instance.start()

    on_stop_signals("keyseal.ca.server", lambda: threading.Thread(target=instance.shutdown, daemon=True).start())
    # What start-up made (modules, SDKs, keysets) lives as long as this process: keep it out of the cyclic
    # garbage collector's passes, which would otherwise walk all of it again and again while SVIDs are issued
    # (about a tenth of an SVID's server time, benchmarks/README.md). A process-wide choice, so it is made here
    # and not in CaServer, which a program may embed.
    gc.freeze()
    instance.serve_forever()
