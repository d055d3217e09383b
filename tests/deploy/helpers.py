"""Paths, tool discovery and command runner shared by the deployment tests (fixtures: conftest.py).

The tools come from ``.ci/install-deploy-tools.sh``: Debian's ``docker-compose`` (1.29), ``kubectl`` (its
built-in kustomize renders the overlays without a cluster) and PyPI's ``kubernetes-validate`` in the
project's virtual environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
K8S = REPO / "k8s"
OVERLAYS = ("base", "cpu", "gpu")
INSTALL_HINT = "run `bash .ci/install-deploy-tools.sh`"


def overlay_dir(name: str) -> Path:
    return K8S / "base" if name == "base" else K8S / "overlays" / name


def run(command: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def compose_command() -> list[str] | None:
    """Debian's docker-compose 1.29 (what CI installs); else the Compose v2 plugin of a developer's Docker."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    return None


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl") and run(["kubectl", "kustomize", "--help"]).returncode == 0:
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def kubernetes_validate_command() -> list[str] | None:
    beside_python = Path(sys.executable).with_name("kubernetes-validate")
    if beside_python.is_file():
        return [str(beside_python)]
    found = shutil.which("kubernetes-validate")
    return [found] if found else None


def compose_env(**overrides: str) -> dict[str, str]:
    """The environment of a compose run: no .env, none of the caller's compose variables, then overrides."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPOSE_", "MMEDRAG_", "VLLM_", "QDRANT", "GENERATOR_", "IMAGE_TAG"))
        and key not in {"ARTIFACTS_DIR", "ROUTER_BIND", "ROUTER_PORT", "INDEX_DATA"}
    }
    env.update(overrides)
    return env
