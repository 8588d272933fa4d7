"""Who may use a node's control API: file permissions on a unix socket, tokens on TCP.

How this works: on a unix socket (the default) access is the socket file's permissions:
``unix_socket_mode`` gives the mode and group the listener is created with -- 0600, the
daemon's own user, or 0660 with ``[node] control_group`` -- and ``ControlServer`` binds under
that umask, so the file is never more open than that, not even for an instant.  On TCP the
listener is TLS (the node's identity certificate, or its ``[tls]`` one) and ``BearerAuth``, an
ASGI wrapper around the whole application, lets a request through only with ``Authorization:
Bearer TOKEN`` naming a token of ``io/control_tokens.py``: a ``read`` token may use GET and
HEAD only, an ``admin`` token anything.  Refusals are the API's own JSON errors (401
``unauthorized`` with a ``WWW-Authenticate`` challenge, 403 ``forbidden``), and each is logged
with the client's address and the token's name (never the token).
"""

from __future__ import annotations

import grp

import structlog
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from volkeeper.errors import ConfigError
from volkeeper.io.control_tokens import TokenStore

log = structlog.get_logger("volkeeper.control")

READ_METHODS = {"GET", "HEAD"}


def unix_socket_mode(group: str | None) -> tuple[int, int | None]:
    """(mode, gid) of the control socket: 0600 alone, 0660 with ``group``'s id."""
    if group is None:
        return 0o600, None
    try:
        return 0o660, grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"node.control_group: no group named {group!r} on this system") from None


class BearerAuth:
    """Lets a request reach ``app`` only with a token of ``tokens`` that allows it."""

    def __init__(self, app: ASGIApp, tokens: TokenStore) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, code, message, hint = refusal
        client = scope.get("client") or ("?", 0)
        log.warning("control API request refused", client=client[0], why=message)
        body = {"error": {"code": code, "message": message, "hint": hint}}
        headers = {"WWW-Authenticate": 'Bearer realm="volkeeper"'} if status == 401 else None
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str, str] | None:
        presented = _bearer(scope)
        hint = "create one on the node: volkeeper token create NAME --role read|admin"
        if presented is None:
            return 401, "unauthorized", "this control API needs a bearer token", hint
        try:
            found = self.tokens.role_of(presented)
        except ConfigError as exc:  # the token file is damaged: nobody gets in
            log.error("control API tokens unreadable", error=str(exc))
            return 401, "unauthorized", "the node's token file is unreadable", str(exc)
        if found is None:
            return 401, "unauthorized", "the bearer token is not one of this node's", hint
        name, role = found
        if role != "admin" and scope["method"] not in READ_METHODS:
            return (
                403,
                "forbidden",
                f"token {name} may only read ({scope['method']} {scope['path']} changes things)",
                "use an admin token",
            )
        return None


def _bearer(scope: Scope) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key.lower() == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if kind.lower() == "bearer" and token.strip() else None
    return None
