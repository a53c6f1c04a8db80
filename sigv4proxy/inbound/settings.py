"""What the inbound adapters take from the config, derived once at start.

Owns: `InboundSettings`. Must never: import anything of ours.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InboundSettings:
    max_body_size: int | None = None  # a streamed body past this: 413 (a declared one: see prepare)
    # the longest client silence mid-body before 408, and the longest a client may take nothing
    # of its answer before its connection is cut
    read_timeout: float = 60.0
    splice: bool = False  # a large declared body may be taken off the socket (splice, TLS reads)
    transparent: bool = False  # read the original destination of redirected connections
