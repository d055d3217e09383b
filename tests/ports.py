"""Free loopback ports for tests that start real servers."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from services.launcher import free_base_port as launcher_free_base_port

HOST = "127.0.0.1"


def free_base_port() -> int:
    """A port p such that p..p+3 are all free (the router and the three services after it)."""
    return launcher_free_base_port(HOST)


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int, *, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a daemon thread on loopback; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
