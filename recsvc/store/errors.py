"""What a failed Redis call means for the service, decided in one place.

Only a failure of the store itself may mark it down for the whole process
(health NOT_SERVING, every Recommend ``degraded``, feedback UNAVAILABLE). A
command that fails because of what one request carried must fail that request
alone: otherwise one malformed event degrades the service for every client.

* :class:`StoreUnavailable`: the connection or the server is not usable right
  now (refused, reset, timed out, protocol garbage, ``LOADING``, ``READONLY``
  after a failover, ``MASTERDOWN``, ``BUSY`` with a long script, ``MISCONF``
  when it cannot persist, ``TRYAGAIN``, ``CLUSTERDOWN``, auth; #12: ``UNBLOCKED``
  when a primary waiting in ``WAIT`` is demoted, no reachable cluster node).
  Retrying later is the right thing for the caller.
* :class:`StoreFull`: Redis is out of memory (``OOM``): writes fail, reads work.
* :class:`StoreRequestError`: anything else (a script or command error): this
  request failed; the store is fine. ``invalid`` is set when our own script
  refused the request's data (``RECSVC_INVALID``).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from redis.exceptions import (
    AskError,
    ClusterDownError,
    InvalidResponse,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

# Errors about the server's state, not about the command sent. redis-py maps some
# reply codes to classes (and drops the code from the text); the others, and
# those Redis wraps in a script's error ("... script: ... -READONLY ..."), are
# found by their code in the text.
UNAVAILABLE_CLASSES = (
    RedisConnectionError, RedisTimeoutError, InvalidResponse, OSError, ReadOnlyError,
    NoPermissionError, TryAgainError, ClusterDownError, AskError,
    RedisClusterException,  # (#12) no node reachable, a slot not covered
)  # fmt: skip
UNAVAILABLE_CODES = re.compile(
    r"\b(LOADING|READONLY|MASTERDOWN|BUSY|MISCONF|TRYAGAIN|CLUSTERDOWN|NOREPLICAS|NOAUTH"
    r"|WRONGPASS|NOPERM|MOVED|ASK|UNBLOCKED)\b"
    # (#12) a WAIT sent to a node demoted to replica by a failover the client's slot
    # map has not caught up with: the reply has no code, only this text
    r"|WAIT cannot be used with replica"
)
OOM = re.compile(r"\bOOM\b")
INVALID_PREFIX = "RECSVC_INVALID"


class StoreError(Exception):
    """Base class of the store's own errors."""


class StoreUnavailable(StoreError):
    """Redis cannot be used right now; the whole process should treat it as down."""


class StoreFull(StoreError):
    """Redis refuses writes for lack of memory."""


class StoreRequestError(StoreError):
    """One request's command failed; the store itself is fine.

    ``error_id`` is logged with the Redis error, so an operator can find it
    from what the caller was told."""

    def __init__(self, message: str, error_id: str, invalid: bool = False):
        super().__init__(message)
        self.error_id = error_id
        self.invalid = invalid


def classify(exc: BaseException) -> StoreError:
    """The store error that ``exc``, raised by a Redis call, amounts to."""
    if isinstance(exc, StoreError):
        return exc
    text = str(exc)
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, ResponseError) and text.startswith(INVALID_PREFIX):
        # our own script's refusal (its text quotes client data: test it first)
        return _request_error(described, invalid=True)
    if isinstance(exc, OutOfMemoryError) or OOM.search(text):
        return StoreFull(described)
    if isinstance(exc, UNAVAILABLE_CLASSES) or UNAVAILABLE_CODES.search(text):
        return StoreUnavailable(described)
    # a script or command error (or a DataError before sending): this request's
    return _request_error(described, invalid=False)


def _request_error(described: str, invalid: bool) -> StoreRequestError:
    """A request's failure, logged under a fresh id that the caller is told."""
    error_id = os.urandom(6).hex()
    log.error("redis refused a request (error id %s, invalid input: %s): %s",
              error_id, invalid, described)  # fmt: skip
    return StoreRequestError(described, error_id, invalid)


P = ParamSpec("P")
T = TypeVar("T")


# (#13) calls into the store (each at most one pipelined round trip) and failed ones
# by error class, for the metrics poller (recsvc.api.metrics); per process
CALLS: collections.Counter[str] = collections.Counter()


def store_errors(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Let only :class:`StoreError` out of a store coroutine."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        CALLS["calls"] += 1
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError, RedisClusterException) as exc:
            error = classify(exc)
            CALLS[type(error).__name__] += 1
            raise error from exc

    return wrapper
