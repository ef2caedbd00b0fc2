"""`keyseal server --config FILE`: run the SPIFFE trust-domain server (docs/server-api.md)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import click

__all__ = ["server"]

_QUIET_LOGGERS = ("botocore", "boto3", "urllib3", "kubernetes")


def _configure_logging(level: str) -> None:
    """Server logs: one line per event, UTC timestamp, level, message (the message itself is never altered,
    so `Key wrapping via KMS keyARN=<arn>` can be matched exactly)."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel(level.upper())
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@click.command("server")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="YAML configuration; its keys mirror the Helm chart's values.")
def server(config_path: Path) -> None:
    """Run the SPIFFE trust-domain server: X.509-SVIDs, JWT-SVIDs and the trust bundle over HTTPS."""
    from keyseal.ca.config import load_config
    from keyseal.ca.server import CaServer

    config = load_config(config_path)
    _configure_logging(config.log_level)
    instance = CaServer(config)
    instance.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("keyseal.ca.server").info("signal %d: shutting down", signum)
        threading.Thread(target=instance.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    instance.serve_forever()
