"""The simulator's access log: one JSON line per request, with VPC Lattice's field names.

Owns: the record layout (Lattice's `VpcLatticeAccessLogs` names: startTime, serviceArn,
callerPrincipal, authDeniedReason, responseCode, duration, ...), the bounded in-memory copy that
tests read, and the optional file/stream sink. Fields Lattice fills with "-" when unknown are "-".
Must never: log an Authorization header, a signature, a secret key or a session token (records are
built from an explicit allow-list of fields; no header dump).
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys
from dataclasses import dataclass
from typing import Any, TextIO

# The fields of a Lattice service access log record, in the order the simulator writes them.
FIELDS: tuple[str, ...] = (
    "startTime",
    "serviceNetworkArn",
    "serviceArn",
    "targetGroupArn",
    "resolvedUser",
    "listenerType",
    "sourceVpcArn",
    "sourceVpcId",
    "destinationVpcId",
    "sourceIpPort",
    "targetIpPort",
    "hostHeader",
    "serverNameIndication",
    "requestMethod",
    "requestPath",
    "protocol",
    "responseCode",
    "bytesReceived",
    "bytesSent",
    "duration",
    "requestToTargetDuration",
    "responseFromTargetDuration",
    "userAgent",
    "sslCipher",
    "tlsVersion",
    "callerPrincipal",
    "callerPrincipalTags",
    "authDeniedReason",
    "failureReason",
)


@dataclass
class AccessLogSink:
    """Keeps the last `max_records` records and writes each one as a JSON line to `stream`."""

    records: collections.deque[dict[str, Any]]
    stream: TextIO | None
    owns_stream: bool

    @classmethod
    def open(cls, target: str | pathlib.Path | TextIO | None, max_records: int) -> AccessLogSink:
        records: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_records)
        if target is None:
            return cls(records, None, False)
        if target == "-":
            return cls(records, sys.stdout, False)
        if isinstance(target, (str, pathlib.Path)):
            # Line-buffered append: each record is one short write of a complete line.
            return cls(records, open(target, "a", encoding="utf-8", buffering=1), True)
        return cls(records, target, False)

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.stream is not None:
            self.stream.write(json.dumps(record, separators=(",", ":")) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.owns_stream and self.stream is not None:
            self.stream.close()
        self.stream = None


def new_record() -> dict[str, Any]:
    return {name: "-" for name in FIELDS}
