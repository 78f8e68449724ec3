"""What the server's interceptors share: a handler that refuses a call.

Each interceptor lives in its own module (``auth``, ``admission``...) and
:func:`recsvc.api.server.build_interceptors` lists them in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def method_name(details: grpc.HandlerCallDetails) -> tuple[str, str]:
    """``("recsvc.v1.Recommender", "Recommend")`` from ``/recsvc.v1.Recommender/Recommend``."""
    service, _, name = details.method.lstrip("/").partition("/")
    return service, name


def refusal(
    handler: grpc.RpcMethodHandler,
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: Sequence[tuple[str, str]] = (),
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails the call with
    ``code`` and ``message`` before any servicer code runs."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message, trailing_metadata=tuple(trailing_metadata))

    kind = next(k for k in _KINDS if getattr(handler, k) is not None)
    return handler._replace(**{kind: refuse})  # type: ignore[attr-defined,no-any-return]
