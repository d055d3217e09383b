"""Offline validators of the deployment files and their rendered outputs, found or skipped once per session.

A test that needs a missing tool is skipped with the reason and the fix (`.ci/install-deploy-tools.sh`),
except under CI (CI=true), where .ci/run installs the tools: there a missing tool fails the test, so that
a lost install step cannot turn the deployment checks into silent skips.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from deploy.helpers import (
    COMPOSE_FILE,
    INSTALL_HINT,
    OVERLAYS,
    compose_command,
    compose_env,
    kubernetes_validate_command,
    kustomize_command,
    overlay_dir,
    run,
)


def missing_tool(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI installs it with .ci/install-deploy-tools.sh)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def compose_cmd(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The compose command with this repository's file and an empty env file (a local .env is ignored)."""
    command = compose_command()
    if command is None:
        missing_tool(f"docker-compose is not installed: {INSTALL_HINT}")
    empty_env = tmp_path_factory.mktemp("compose") / "empty.env"
    empty_env.write_text("", encoding="utf-8")
    return [*command, "--env-file", str(empty_env), "-f", str(COMPOSE_FILE)]


@pytest.fixture(scope="session")
def kustomize_cmd() -> list[str]:
    command = kustomize_command()
    if command is None:
        missing_tool(f"kubectl (with its built-in kustomize) is not installed: {INSTALL_HINT}")
    return command


@pytest.fixture(scope="session")
def kubernetes_validate_cmd() -> list[str]:
    command = kubernetes_validate_command()
    if command is None:
        missing_tool(f"kubernetes-validate is not installed: {INSTALL_HINT}")
    return command


@pytest.fixture(scope="session")
def render_compose(compose_cmd: list[str]) -> Callable[..., dict[str, Any]]:
    """``docker-compose [--profile P] config`` parsed; fails the test on a compose error."""
    cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def render(profile: str | None = None, **env: str) -> dict[str, Any]:
        key = (profile, tuple(sorted(env.items())))
        if key not in cache:
            profile_args = ["--profile", profile] if profile else []
            result = run([*compose_cmd, *profile_args, "config"], env=compose_env(**env))
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
