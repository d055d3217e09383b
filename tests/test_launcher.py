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
    assert logs == {"router.log", "classifier.log", "retriever.log", "generator.log", "internal-token"}
    token = tmp_path / "logs" / "internal-token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text().strip()) >= 32


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


def test_logs_hold_no_question_image_or_api_key(tiny_artifacts: Path, tmp_path: Path) -> None:
    """A real request through all four processes leaves no PHI or secret in any service log."""
    import base64
    import json

    from services.router.auth import hash_key

    key, question = "mmr_secret-key-for-log-test-0123456789", "Is the QX7 zebra marker visible?"
    env = dict(os.environ, MMEDRAG_ROUTER_AUTH_ENABLED="true", MMEDRAG_ROUTER_API_KEYS=f"ci:{hash_key(key)}")
    port, logs = free_base_port(), tmp_path / "logs"
    command = [sys.executable, "-m", "mmedrag.cli", "up", "--artifacts", str(tiny_artifacts)]
    command += ["--port", str(port), "--log-dir", str(logs)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    example = json.loads((tiny_artifacts / "examples" / "examples.json").read_text())["radiology"]
    image = (tiny_artifacts / example["image"]).read_bytes()
    try:
        printed = _read_until(process, "Press Ctrl-C to stop.", timeout_s=240)
        assert "API key required" in printed
        url = f"http://127.0.0.1:{port}/vqa"
        files, data = {"image": ("chest.png", image)}, {"question": question}
        ok = httpx.post(url, files=files, data=data, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        refused = httpx.post(url, files=files, data=data, headers={"X-API-Key": key + "-wrong"}, timeout=30)
        assert ok.status_code == 200 and refused.status_code == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = "\n".join(path.read_text(errors="replace") for path in logs.glob("*.log"))
    assert ok.json()["request_id"] in text, "the request should be logged (by id)"
    for secret in (question, "QX7", key, key + "-wrong", base64.b64encode(image[:48]).decode()[:40]):
        assert secret not in text, f"{secret!r} leaked into a service log"
