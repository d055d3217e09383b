"""Container health probe: exit 0 when a local URL answers HTTP 200, 1 otherwise.

The slim Python image has no curl; this uses only the standard library. The URL is the first argument,
else ``HEALTHCHECK_URL`` (the image sets it per target: the services' ``/readyz``, the CPU generator's
``/health``), so one image serves every service.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/readyz"


def probe(url: str, timeout_s: float) -> int:
    """0 if ``url`` answers 200 within ``timeout_s``, else 1 (with the reason on stderr)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # 503 while loading or a dependency is down
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"unhealthy: {url}: {exc}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"unhealthy: {url} answered {status}\n")
        return 1
    return 0


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("HEALTHCHECK_URL", DEFAULT_URL)
    sys.exit(probe(target, float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "4"))))
