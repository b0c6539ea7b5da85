"""API keys for the gateway (the worker secret lives in common/worker_secret.py).

Keys come from `auth.api_keys` and from `auth.api_keys_file` (one key per line, `#` comments and
blank lines skipped). With no key configured, auth is off and every request passes.

A client presents its key in one of these places (first found wins):
  * header `Authorization: Bearer <key>` (the openbmb-realtime SDK always sends it),
  * query parameter `?api_key=<key>` or `?token=<key>` (browsers cannot set WebSocket headers),
  * WebSocket subprotocol `map-api-key.<key>` (browser-style alternative to the query parameter).

HTTP routes use `ApiKeyAuth` itself as a FastAPI dependency (401 on a bad key). WebSocket routes call
`check_websocket()` before accepting and, when it fails, `reject_websocket()` (close 1008) before any
model work is done. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request, WebSocket

from common.config import REPO_ROOT, AuthConfig

KEY_SUBPROTOCOL_PREFIX = "map-api-key."
REALTIME_SUBPROTOCOL = "map.realtime"
QUERY_KEY_PARAMS = ("api_key", "token")
UNAUTHORIZED_CLOSE_CODE = 1008


def read_api_keys_file(path: Path) -> list[str]:
    """Keys in a keys file: one per line; blank lines and `#` comments are skipped."""
    keys = []
    for line in path.read_text().splitlines():
        key = line.split("#", 1)[0].strip()
        if key:
            keys.append(key)
    return keys


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def presented_key(
    headers: Mapping[str, str], query_params: Mapping[str, str], subprotocols: Sequence[str] = ()
) -> str | None:
    """The API key a client presented (header, query, then offered subprotocols), or None."""
    token = _bearer_token(headers.get("authorization"))
    if token:
        return token
    for name in QUERY_KEY_PARAMS:
        if query_params.get(name):
            return query_params[name]
    for proto in subprotocols:
        if proto.startswith(KEY_SUBPROTOCOL_PREFIX) and len(proto) > len(KEY_SUBPROTOCOL_PREFIX):
            return proto[len(KEY_SUBPROTOCOL_PREFIX):]
    return None


@dataclass(frozen=True)
class WebSocketAuthResult:
    """Outcome of `ApiKeyAuth.check_websocket`.

    `subprotocol` is what to pass to `websocket.accept(subprotocol=...)`: `map.realtime` when the
    client offered it (realtime SDK), else the `map-api-key.*` entry the key came from (a browser
    fails the handshake if the server selects none of the subprotocols it offered), else None.
    """

    ok: bool
    subprotocol: str | None


class ApiKeyAuth:
    """The configured API keys; callable as a FastAPI dependency for HTTP routes."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in dict.fromkeys(keys) if k]

    @classmethod
    def from_config(cls, auth: AuthConfig, base_dir: Path = REPO_ROOT) -> ApiKeyAuth:
        """Keys from `auth.api_keys` plus `auth.api_keys_file` (relative paths resolve from base_dir)."""
        keys = list(auth.api_keys)
        if auth.api_keys_file:
            path = Path(auth.api_keys_file)
            keys += read_api_keys_file(path if path.is_absolute() else base_dir / path)
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def is_valid(self, key: str | None) -> bool:
        """True when auth is off, or `key` equals a configured key (constant-time, all keys compared)."""
        if not self.enabled:
            return True
        if not key:
            return False
        candidate = key.encode()
        matched = False
        for known in self._keys:
            matched |= hmac.compare_digest(candidate, known)
        return matched

    async def __call__(self, request: Request) -> None:
        """FastAPI dependency: `dependencies=[Depends(auth)]`; raises 401 on a missing or bad key."""
        if not self.is_valid(presented_key(request.headers, request.query_params)):
            raise HTTPException(
                status_code=401, detail="invalid or missing API key", headers={"WWW-Authenticate": "Bearer"}
            )

    def check_websocket(self, websocket: WebSocket) -> WebSocketAuthResult:
        """Check a WebSocket's key before `accept()`; also picks the subprotocol to accept with."""
        offered: list[str] = websocket.scope.get("subprotocols") or []
        key_protocols = [p for p in offered if p.startswith(KEY_SUBPROTOCOL_PREFIX)]
        if REALTIME_SUBPROTOCOL in offered:
            subprotocol: str | None = REALTIME_SUBPROTOCOL
        else:
            subprotocol = key_protocols[0] if key_protocols else None
        ok = self.is_valid(presented_key(websocket.headers, websocket.query_params, offered))
        return WebSocketAuthResult(ok=ok, subprotocol=subprotocol)


async def reject_websocket(
    websocket: WebSocket, subprotocol: str | None = None, error_frame: dict | None = None
) -> None:
    """Accept, send `error_frame` if given (protocol-specific shape), then close 1008 "unauthorized"."""
    await websocket.accept(subprotocol=subprotocol)
    if error_frame is not None:
        await websocket.send_json(error_frame)
    await websocket.close(code=UNAUTHORIZED_CLOSE_CODE, reason="unauthorized")

