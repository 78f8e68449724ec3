"""Bearer-token authorisation: a server interceptor and the token file it reads.

The token file has one token per line, ``ROLE TOKEN [NAME]`` (``#`` starts a
comment): role ``admin`` may call every method, role ``client`` all but
:data:`ADMIN_METHODS`. Callers send ``authorization: Bearer TOKEN`` metadata.
Health and reflection stay open (load balancers and tools probe them).
Tokens are kept as SHA-256 digests and never logged; logs name the caller by NAME.
"""

from __future__ import annotations

import hashlib
import logging
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from recsvc.api.interceptors import method_name, refusal

log = logging.getLogger(__name__)

ROLES = ("admin", "client")
ADMIN_METHODS = frozenset({"ReloadModel", "GetUserState"})
MIN_TOKEN_LENGTH = 16
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})


@dataclass(frozen=True)
class Caller:
    role: str
    name: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_token_file(path: Path) -> dict[bytes, Caller]:
    """Token digest -> caller, from ``path``; ``ValueError`` naming the line at fault
    (never the token itself)."""
    tokens: dict[bytes, Caller] = {}
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by group or others: chmod 600 it", path)
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) not in (2, 3):
            raise ValueError(f"{where}: expected 'ROLE TOKEN [NAME]'")
        role, token = fields[0].lower(), fields[1]
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {fields[0]!r}; roles: {', '.join(ROLES)}")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"{where}: tokens must have at least {MIN_TOKEN_LENGTH} characters")
        digest = _digest(token)
        if digest in tokens:
            raise ValueError(f"{where}: the same token appears twice")
        tokens[digest] = Caller(role, fields[2] if len(fields) == 3 else f"line {number}")
    if not tokens:
        raise ValueError(f"{path}: no tokens (a line is 'ROLE TOKEN [NAME]')")
    return tokens


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class BearerAuth(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call to ``service``; other services pass."""

    def __init__(self, tokens: dict[bytes, Caller], service: str):
        self.tokens = tokens
        self.service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service, method = method_name(details)
        if handler is None or service != self.service:
            return handler
        token = bearer_token(details.invocation_metadata)  # type: ignore[arg-type]
        if not token:
            return refusal(
                handler, grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs a token: send metadata 'authorization: Bearer <token>'"
                + ("" if token is None else " (the authorization value is not 'Bearer <token>')"),
            )  # fmt: skip
        caller = self.tokens.get(_digest(token))
        if caller is None:
            return refusal(
                handler, grpc.StatusCode.UNAUTHENTICATED,
                "unknown or revoked token (ask the operator for one from the server's token file)",
            )  # fmt: skip
        if method in ADMIN_METHODS and caller.role != "admin":
            log.info("permission denied", extra={"caller": caller.name, "method": method})
            return refusal(
                handler, grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs a token with role admin; this one ({caller.name}) has role "
                f"{caller.role}",
            )  # fmt: skip
        return handler


def auth_interceptors(
    tokens_file: Path | None, host: str, service: str
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptor for ``tokens_file``; none (open, as without a file) when it is
    unset, with a warning if ``host`` is reachable beyond loopback."""
    if tokens_file is None:
        if host.strip() not in LOOPBACK_HOSTS and not host.startswith("127."):
            log.warning(
                "no tokens configured (--auth-tokens): any caller that reaches %s may reload "
                "the model and read any user's state; set a token file, or listen on "
                "127.0.0.1 only", host,
            )  # fmt: skip
        return []
    tokens = read_token_file(tokens_file)
    roles = sorted({c.role for c in tokens.values()})
    log.info("bearer tokens required", extra={"tokens": len(tokens), "roles": ",".join(roles)})
    return [BearerAuth(tokens, service)]
