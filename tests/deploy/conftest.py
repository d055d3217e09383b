"""Offline validators of the deployment files and their rendered outputs, found or skipped once per session.

The tools come from ``.ci/install-deploy-tools.sh``: Debian's ``docker-compose`` (1.29), ``kubectl`` (its
built-in kustomize renders the overlays without a cluster) and PyPI's ``kubernetes-validate`` in the
project's virtual environment. A test that needs a missing tool is skipped with the reason and the fix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

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


def _compose_command() -> list[str] | None:
    """Debian's docker-compose 1.29 (what CI installs); else the Compose v2 plugin of a developer's Docker."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    return None


def _kustomize_command() -> list[str] | None:
    if shutil.which("kubectl") and run(["kubectl", "kustomize", "--help"]).returncode == 0:
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def _kubernetes_validate_command() -> list[str] | None:
    beside_python = Path(sys.executable).with_name("kubernetes-validate")
    if beside_python.is_file():
        return [str(beside_python)]
    found = shutil.which("kubernetes-validate")
    return [found] if found else None


@pytest.fixture(scope="session")
def compose_cmd() -> list[str]:
    command = _compose_command()
    if command is None:
        pytest.skip(f"docker-compose is not installed: {INSTALL_HINT}")
    return command


@pytest.fixture(scope="session")
def kustomize_cmd() -> list[str]:
    command = _kustomize_command()
    if command is None:
        pytest.skip(f"kubectl (with its built-in kustomize) is not installed: {INSTALL_HINT}")
    return command


@pytest.fixture(scope="session")
def kubernetes_validate_cmd() -> list[str]:
    command = _kubernetes_validate_command()
    if command is None:
        pytest.skip(f"kubernetes-validate is not installed: {INSTALL_HINT}")
    return command


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


@pytest.fixture(scope="session")
def render_compose(compose_cmd: list[str]) -> Callable[..., dict[str, Any]]:
    """``docker-compose [--profile P] config`` parsed; fails the test on a compose error."""
    cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def render(profile: str | None = None, **env: str) -> dict[str, Any]:
        key = (profile, tuple(sorted(env.items())))
        if key not in cache:
            profile_args = ["--profile", profile] if profile else []
            result = run(
                [*compose_cmd, "-f", str(COMPOSE_FILE), *profile_args, "config"], env=compose_env(**env)
            )
            assert result.returncode == 0, result.stderr
            cache[key] = yaml.safe_load(result.stdout)
        return cache[key]

    return render


@pytest.fixture(scope="session")
def compose_source() -> dict[str, Any]:
    """docker-compose.yml as written (anchors and merge keys resolved by YAML, variables not interpolated)."""
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def rendered_text(kustomize_cmd: list[str]) -> dict[str, str]:
    """Each kustomization rendered to YAML text: base, cpu, gpu."""
    texts = {}
    for name in OVERLAYS:
        result = run([*kustomize_cmd, str(overlay_dir(name))])
        assert result.returncode == 0, f"{name}: {result.stderr}"
        texts[name] = result.stdout
    return texts


@pytest.fixture(scope="session")
def rendered(rendered_text: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Each kustomization's resources, parsed."""
    return {name: [doc for doc in yaml.safe_load_all(text) if doc] for name, text in rendered_text.items()}
