"""The event loop of recsvc's processes: uvloop unless ``RECSVC_EVENT_LOOP=asyncio``.

grpc.aio, redis-py and our handlers spend a large share of a call's CPU in the
event loop itself (scheduling callbacks and tasks, polling sockets); uvloop
runs that in C. The load-test clients and the empty server use the same loop,
so side-by-side numbers compare like with like.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the configured event loop."""
    if os.environ.get("RECSVC_EVENT_LOOP", "uvloop") == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
