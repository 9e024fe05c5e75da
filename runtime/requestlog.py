"""One log line per request for `hub serve`: id, method, status, adapters as resolved (name@version),
tokens in and out, and latency, as text or JSON (one object a line), for an operator to follow
or a log shipper to parse."""
from __future__ import annotations

import json
import sys
import threading
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import TextIO


REQUEST_ID_KEY = "x-request-id"  # the gRPC metadata key (initial and trailing) that tells a client its request's id


class LogFormat(str, Enum):
    text = "text"
    json = "json"
    off = "off"


@dataclass
class RequestRecord:
    """What one RPC did, filled in by its handler as it learns it."""

    method: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    adapters: list[str] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0


class RequestLog:
    """Writes each finished request as one line; the lock keeps lines from RPC threads whole."""

    def __init__(self, fmt: LogFormat | str = LogFormat.text, stream: TextIO | None = None) -> None:
        self.format = LogFormat(fmt)
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def write(self, record: RequestRecord, status: str, seconds: float) -> None:
        if self.format is LogFormat.off:
            return
        fields = {"id": record.id, "method": record.method, "status": status, "adapters": record.adapters,
                  "tokens_in": record.tokens_in, "tokens_out": record.tokens_out,
                  "latency_ms": round(seconds * 1000, 1)}
        if self.format is LogFormat.json:
            line = json.dumps(fields)
        else:
            fields["adapters"] = ",".join(record.adapters) or "-"
            line = "request " + " ".join(f"{k}={v}" for k, v in fields.items())
        with self._lock:
            print(line, file=self.stream, flush=True)
