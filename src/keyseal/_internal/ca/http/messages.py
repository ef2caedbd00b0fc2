"""Requests and answers of the HTTP API as plain values, shared by the API's route modules (api, agents)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JSON", "Request", "Response", "_Refused", "_json"]

JSON = "application/json"


@dataclass(slots=True)  # not frozen: building a frozen dataclass costs microseconds, and every request builds one
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    peer: str
    peer_certificate: bytes | None = None


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps would build one per answer


def _json(status: int, document: dict[str, Any]) -> Response:
    return Response(status, _ENCODER.encode(document).encode() + b"\n")
