"""``mmedrag up`` as a user runs it: readiness, the printed help, one log per service, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from ports import free_base_port

from services.common.artifacts import ArtifactError
from services.launcher import run_stack


def _read_until(process: subprocess.Popen, marker: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    seen = ""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen += line
        if marker in line:
            return seen
    raise AssertionError(f"'{marker}' not printed in {timeout_s}s; output so far:\n{seen}")


def test_up_starts_prints_and_stops_cleanly_on_sigterm(tiny_artifacts: Path, tmp_path: Path) -> None:
    port = free_base_port()
    command = [
        sys.executable,
        "-m",
        "mmedrag.cli",
        "up",
        "--artifacts",
        str(tiny_artifacts),
        "--port",
        str(port),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ)
    )
    try:
        printed = _read_until(process, "Press Ctrl-C to stop.", timeout_s=240)
        assert f"ready at http://127.0.0.1:{port}" in printed
        assert f"http://127.0.0.1:{port}/docs" in printed and "curl -s -F image=@" in printed
        assert "auth:     OFF" in printed  # the embedded default runs open on loopback, and says so
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 4
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"children left running: {alive}"
    finally:
        if process.poll() is None:
            process.kill()
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert logs == {"router.log", "classifier.log", "retriever.log", "generator.log"}


def test_up_without_artifacts_names_the_file_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"manifest.json.*mmedrag artifacts tiny"):
        run_stack(tmp_path / "missing", log_dir=tmp_path / "logs")


def test_auth_stays_on_off_loopback(tmp_path: Path) -> None:
    from services.launcher import auth_notice, service_environment

    open_env = service_environment(tmp_path, "127.0.0.1", 9000)
    exposed_env = service_environment(tmp_path, "0.0.0.0", 9000)
    assert open_env["MMEDRAG_ROUTER_AUTH_ENABLED"] == "false" and "OFF" in auth_notice(open_env, "127.0.0.1")
    assert "MMEDRAG_ROUTER_AUTH_ENABLED" not in exposed_env or os.environ.get("MMEDRAG_ROUTER_AUTH_ENABLED")
    assert "API key required" in auth_notice({}, "0.0.0.0")
