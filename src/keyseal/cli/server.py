"""`keyseal server --config FILE`: run the SPIFFE trust-domain server (docs/server-api.md)."""

from __future__ import annotations

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
    instance.serve_forever()
