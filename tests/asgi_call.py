"""Call an ASGI app in process, the smallest way: one HTTP request, its status.

For tests that drive a middleware thousands of times (a flood from many
clients) or need nothing of a response but its status; httpx's
ASGITransport is the fuller client for the rest.
"""

from __future__ import annotations

from typing import Any


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    """An app that answers 200 "ok"."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def get(app: Any, ip: str, path: str = "/", headers: list[tuple[bytes, bytes]] | None = None) -> int:
    """GET ``path`` from client address ``ip`` through ``app``: the response's status."""
    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": headers or [], "client": (ip, 1234), "server": ("t", 80),
             "scheme": "http", "http_version": "1.1", "asgi": {"version": "3.0"}}
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(m: dict[str, Any]) -> None:
        if m["type"] == "http.response.start":
            status.append(m["status"])

    await app(scope, receive, send)
    return status[0]
