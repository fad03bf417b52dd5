"""Loopback HTTP servers that behave like the destination APIs: `audience-sync sandbox`, and the tests'. The
same request handling also answers in process, as an `httpx.MockTransport` (`transport(*servers)`).

Each server records every request, counts what it accepted, and can be made to misbehave: canned responses
(`fault`, its body sent slowly if asked), dropped connections (`reset_connection`), requests accepted but
answered too late or not at all (`accept_then`), a share of 503s (`fail_ratio`), latency (`delay`) and a
token-bucket rate limit answering 429 (`rate_limit`). Everflow's also keeps the conversions its postbacks
leave, served by the Network API's conversion report and events endpoints (`everflow_reports.py`). They
emulate only what the platforms' published documentation (gathered in REFERENCE.md) and section 6 of DESIGN.md
state, each fact commented with its source; what those leave open is kept plain and marked "not documented;
chosen here".
"""

from sync.sandbox.everflow import EverflowServer
from sync.sandbox.fake import FakeServer, transport
from sync.sandbox.http import Recorded, Response
from sync.sandbox.refersion import RefersionServer
from sync.sandbox.segment import SegmentServer

__all__ = [
    "EverflowServer",
    "FakeServer",
    "Recorded",
    "RefersionServer",
    "Response",
    "SegmentServer",
    "transport",
]
