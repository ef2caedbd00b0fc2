"""`keyseal agent --config FILE`: the node agent serving the SPIFFE Workload API (docs/agent.md)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["agent"]


@click.command("agent")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The agent's YAML configuration.")
def agent(config_path: Path) -> None:
    """Run the node agent: join the trust-domain server and serve SVIDs to local workloads."""
    from keyseal._internal.agent.config import load_agent_config
    from keyseal._internal.agent.main import Agent
    from keyseal._internal.cli.service import configure_logging, on_stop_signals

    config = load_agent_config(config_path)
    configure_logging(config.log_level)
    instance = Agent(config)
    instance.start()

    on_stop_signals("keyseal._internal.agent", instance.request_stop)
    instance.wait()
    instance.stop()
