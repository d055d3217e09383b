"""docker/Dockerfile and .dockerignore: the promises of the images, checked without a Docker engine.

No Docker engine runs on the CI machines, so the image is not built here; these tests read the Dockerfile
and check what it promises: CPU torch at the project's pins, layer order, non-root, health check, the
module entry point, and a build context that carries what the COPY lines need and nothing heavy.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
from deploy.helpers import REPO

from services.common.settings_doc import _settings_classes, env_names

DOCKERFILE = REPO / "docker" / "Dockerfile"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
    return result


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions of each named build stage."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in instructions(text):
        if keyword == "FROM":
            name = args.split(" AS ")[-1] if " AS " in args else args
            current = result.setdefault(name, [])
        if current is not None:
            current.append((keyword, args))
    return result


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return dict(dep.split("==", 1) for dep in project["dependencies"] if "==" in dep)


def test_stages(dockerfile: str) -> None:
    assert list(stages(dockerfile)) == ["builder", "runtime", "generator-cpu"]
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base is not None
    # pinned to a patch release of the project's Python, slim
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1)), base.group(1)


def test_torch_comes_from_the_cpu_index_at_the_project_pins(dockerfile: str) -> None:
    builder = stages(dockerfile)["builder"]
    torch_install = next(args for keyword, args in builder if keyword == "RUN" and "torch==" in args)
    assert "--index-url" in torch_install
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    versions = dict(re.findall(r"\b(torch|torchvision)==(\S+)", torch_install))
    expected = pins()
    assert versions == {"torch": expected["torch"], "torchvision": expected["torchvision"]}


def test_dependencies_are_installed_before_the_sources_are_copied(dockerfile: str) -> None:
    builder = stages(dockerfile)["builder"]
    copies = [(i, args) for i, (keyword, args) in enumerate(builder) if keyword == "COPY"]
    assert copies[0][1] == "pyproject.toml README.md ./"
    install_deps = next(i for i, (k, a) in enumerate(builder) if k == "RUN" and "requirements.txt" in a)
    first_source = next(i for i, args in copies if args.split()[0] in {"mmedrag", "services", "training"})
    assert copies[0][0] < install_deps < first_source
    assert {args.split()[0] for _, args in copies[1:]} == {"mmedrag", "services", "training"}
    assert any(k == "RUN" and "pip install --no-deps ." in a for k, a in builder)


def test_runtime_runs_as_uid_1000_with_a_health_check_and_the_module_entry_point(dockerfile: str) -> None:
    runtime = stages(dockerfile)["runtime"]
    keywords = dict(runtime)
    assert keywords["USER"] == "1000:1000"
    assert "--uid 1000" in next(a for k, a in runtime if k == "RUN" and "useradd" in a)
    assert keywords["HEALTHCHECK"].endswith('CMD ["python", "/opt/mmedrag/healthcheck.py"]')
    assert json.loads(keywords["ENTRYPOINT"]) == ["python", "-m"]
    assert json.loads(keywords["CMD"]) == ["services.router"]
    generator = dict(stages(dockerfile)["generator-cpu"])
    assert json.loads(generator["CMD"]) == ["services.generator"]
    assert "HEALTHCHECK_URL=http://127.0.0.1:8003/health" in generator["ENV"]
    # the builder's virtual environment is all that reaches the runtime: no compilers, no build context
    assert [a for k, a in runtime if k == "COPY"] == [
        "--from=builder /opt/venv /opt/venv",
        "docker/healthcheck.py /opt/mmedrag/healthcheck.py",
    ]


def test_image_environment_names_known_settings(dockerfile: str) -> None:
    known = set().union(*(env_names(cls) for _, cls in _settings_classes()))
    set_in_image = set(re.findall(r"\b(MMEDRAG_[A-Z0-9_]+)=", dockerfile))
    assert set_in_image, "the image sets the container defaults (hosts, artifacts)"
    assert set_in_image <= known, sorted(set_in_image - known)
    assert "MMEDRAG_ARTIFACTS=/artifacts" in dockerfile
    for service in ("ROUTER", "CLASSIFIER", "RETRIEVER", "GENERATOR"):
        assert f"MMEDRAG_{service}_HOST=0.0.0.0" in dockerfile


def test_the_modules_the_images_run_exist(dockerfile: str) -> None:
    import importlib.util

    for _, stage in stages(dockerfile).items():
        for keyword, args in stage:
            if keyword == "CMD" and args.startswith("["):
                (module,) = json.loads(args)
                assert importlib.util.find_spec(f"{module}.__main__") is not None, module


# ------------------------------------------------------------------------------------------ .dockerignore


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches everything under it."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            matched = any(fnmatch(part, pattern[3:]) for part in parts) or any(
                fnmatch(prefix, pattern[3:]) for prefix in prefixes
            )
        else:
            matched = any(
                fnmatch(prefix, pattern) and prefix.count("/") == pattern.count("/") for prefix in prefixes
            )
        if matched:
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_build_context_has_what_the_copies_need(dockerfile: str, ignore_patterns: list[str]) -> None:
    sources = []
    for keyword, args in instructions(dockerfile):
        if keyword == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not dockerignore_excludes(source, ignore_patterns), (
            f"{source} is left out of the build context"
        )
    assert not dockerignore_excludes("services/router/app.py", ignore_patterns)
    assert not dockerignore_excludes("training/data/medsynth/catalogue.json", ignore_patterns)


@pytest.mark.parametrize(
    "path",
    [
        "artifacts/generator/model.safetensors",
        ".venv/bin/python",
        "tests/test_cli.py",
        "data/medsynth/radiology/images/1.png",
        ".git/HEAD",
        ".env",
        "services/__pycache__/launcher.cpython-311.pyc",
        "logs/router.log",
    ],
)
def test_build_context_leaves_out_heavy_and_secret_files(ignore_patterns: list[str], path: str) -> None:
    assert dockerignore_excludes(path, ignore_patterns)


# ------------------------------------------------------------------------------------------ healthcheck.py


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = {"/ok": 200, "/loading": 503}.get(self.path, 404)
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def test_healthcheck_passes_on_200(local_server: str) -> None:
    assert probe(f"{local_server}/ok").returncode == 0


@pytest.mark.parametrize("path", ["/loading", "/missing"])
def test_healthcheck_fails_on_other_statuses(local_server: str, path: str) -> None:
    result = probe(f"{local_server}{path}")
    assert result.returncode == 1
    assert "unhealthy" in result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = probe(f"http://127.0.0.1:{port}/readyz")
    assert result.returncode == 1


def test_healthcheck_reads_its_url_from_the_environment(local_server: str) -> None:
    assert probe(env={**os.environ, "HEALTHCHECK_URL": f"{local_server}/ok"}).returncode == 0
    assert probe(env={**os.environ, "HEALTHCHECK_URL": f"{local_server}/loading"}).returncode == 1


def test_dockerfile_lives_where_compose_builds_from() -> None:
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    targets = set()
    for service in compose["services"].values():
        build = service.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]) == DOCKERFILE
            targets.add(build["target"])
    assert targets == {"runtime", "generator-cpu"}
    assert Path(DOCKERFILE).is_file()


def test_the_images_install_no_evaluation_packages() -> None:
    """The images install ``project.dependencies`` only; metrics and plots are the ``eval`` extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {re.split(r"[=<>;\[ ]", item, maxsplit=1)[0].lower() for item in project["dependencies"]}
    evaluation = {
        re.split(r"[=<>;\[ ]", item, maxsplit=1)[0].lower()
        for item in project["optional-dependencies"]["eval"]
    }
    assert {"matplotlib", "pycocoevalcap", "rouge-score"} <= evaluation
    assert not core & {"matplotlib", "pycocoevalcap", "rouge-score"}
    assert "mmed-rag[otel,eval]" in project["optional-dependencies"]["dev"]  # `make install` has them
