"""Free loopback ports for tests that start real servers."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_base_port() -> int:
    """A port p such that p..p+3 are all free (the router and the three services after it)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            base = probe.getsockname()[1]
        if base + 3 > 65535:
            continue
        try:
            sockets = []
            for offset in range(4):
                s = socket.socket()
                s.bind((HOST, base + offset))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no four consecutive free ports")
