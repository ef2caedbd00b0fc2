"""`keyseal agent --config FILE`: the node agent serving the SPIFFE Workload API (docs/agent.md)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType

import click

__all__ = ["agent"]


@click.command("agent")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The agent's YAML configuration.")
def agent(config_path: Path) -> None:
    """Run the node agent: join the trust-domain server and serve SVIDs to local workloads."""
    from keyseal.agent.config import load_agent_config
    from keyseal.agent.main import Agent
    from keyseal.cli.server import _configure_logging

    config = load_agent_config(config_path)
    _configure_logging(config.log_level)
    instance = Agent(config)
    instance.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("keyseal.agent").info("signal %d: shutting down", signum)
        instance.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    instance.wait()
    instance.stop()
