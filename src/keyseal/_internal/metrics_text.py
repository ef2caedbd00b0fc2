"""The Prometheus text exposition format (version 0.0.4) that the server's and the agent's /metrics both serve."""

__all__ = ["CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
