"""docker-compose.yml: valid for every profile, and keeps its promises (ports, profiles, vLLM, settings)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from deploy.helpers import COMPOSE_FILE, REPO, compose_env, run

from services.common.settings_doc import _settings_classes, env_name, env_names

# compose service -> the settings class (by _settings_classes name) its MMEDRAG_* variables belong to
SERVICE_SETTINGS = {
    "router": "router",
    "classifier": "classifier",
    "retriever": "retriever",
    "generator-cpu": "generator",
    "index": "retriever",  # `mmedrag index` reads the retriever's Qdrant variables
}
OUR_SERVICES = ("index", "classifier", "retriever", "router", "generator-cpu")
LONG_RUNNING = ("qdrant", "classifier", "retriever", "router", "vllm", "generator-cpu")
PROFILES = (None, "cpu", "gpu")


def settings_env(name: str) -> set[str]:
    return env_names(dict(_settings_classes())[name])


def flag_values(args: list[str]) -> dict[str, str]:
    """``--flag value`` and ``--flag=value`` pairs of a command line (the last one wins)."""
    values: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        if arg.startswith("--"):
            if "=" in arg:
                key, value = arg.split("=", 1)
                values[key] = value
            elif i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                values[arg] = str(args[i + 1])
                i += 1
            else:
                values[arg] = ""
        i += 1
    return values


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE list form
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


@pytest.mark.parametrize("profile", PROFILES, ids=["no-profile", "cpu", "gpu"])
def test_compose_config_is_valid(compose_cmd: list[str], profile: str | None) -> None:
    profile_args = ["--profile", profile] if profile else []
    result = run([*compose_cmd, *profile_args, "config", "-q"], env=compose_env())
    assert result.returncode == 0, result.stderr


def test_no_top_level_name_key(compose_source: dict[str, Any]) -> None:
    """docker-compose 1.29 (Debian) rejects `name:`; `version:` is obsolete in the Compose Specification."""
    assert "name" not in compose_source
    assert "version" not in compose_source


def test_only_the_router_publishes_a_port(compose_source: dict[str, Any], render_compose: Any) -> None:
    for services in (compose_source["services"], render_compose("gpu")["services"]):
        publishing = {name for name, service in services.items() if service.get("ports")}
        assert publishing == {"router"}
        for name, service in services.items():
            assert service.get("network_mode") != "host", name
    assert compose_source["services"]["router"]["ports"] == [
        "${ROUTER_BIND:-127.0.0.1}:${ROUTER_PORT:-8000}:8000"
    ]


def test_everything_but_the_router_is_on_the_internal_network_only(compose_source: dict[str, Any]) -> None:
    assert compose_source["networks"]["backend"]["internal"] is True
    for name, service in compose_source["services"].items():
        networks = set(service["networks"])
        assert networks == ({"frontend", "backend"} if name == "router" else {"backend"}), name


def test_profiles_swap_the_generator_under_one_name(compose_source: dict[str, Any]) -> None:
    services = compose_source["services"]
    assert services["vllm"]["profiles"] == ["gpu"]
    assert services["generator-cpu"]["profiles"] == ["cpu"]
    for name in ("vllm", "generator-cpu"):
        assert services[name]["networks"]["backend"]["aliases"] == ["generator"]
    # every other service runs whatever the profile
    assert [name for name, s in services.items() if "profiles" in s] == ["vllm", "generator-cpu"]
    # both listen where the router looks, and the router never waits on a profile-only service
    router_env = environment(services["router"])
    assert router_env["MMEDRAG_ROUTER_GENERATOR_URL"] == "http://generator:8003/v1"
    assert flag_values(services["vllm"]["command"])["--port"] == "8003"
    assert environment(services["generator-cpu"])["MMEDRAG_GENERATOR_PORT"] == "8003"
    assert set(services["router"]["depends_on"]) == {"classifier", "retriever"}


def test_vllm_serves_the_exported_folder_with_its_chat_template(render_compose: Any) -> None:
    vllm = render_compose("gpu")["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:v")
    assert vllm["entrypoint"] == ["vllm", "serve"]
    model_dir = vllm["command"][0]
    flags = flag_values(vllm["command"][1:])
    assert flags["--chat-template"] == f"{model_dir}/chat_template.jinja"
    assert json.loads(flags["--limit-mm-per-prompt"]) == {"image": 1}
    assert int(flags["--max-model-len"]) > 0
    # no local-file or remote-domain media access is opened
    assert "--allowed-local-media-path" not in flags
    assert "--allowed-media-domains" not in flags
    # the model folder is artifacts/generator, mounted read-only (short syntax in 1.29, long in v2)
    mounts = [
        (v["source"], v["target"], "ro" if v.get("read_only") else "rw")
        if isinstance(v, dict)
        else tuple(v.split(":"))
        for v in vllm["volumes"]
    ]
    assert [(Path(src), mode) for src, dst, mode in mounts if dst == model_dir] == [
        (REPO / "artifacts" / "generator", "ro")
    ]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "/health" in " ".join(vllm["healthcheck"]["test"])


@pytest.mark.parametrize("model", [None, "llava-med-7b-mmedrag"])
def test_served_model_name_equals_the_routers(render_compose: Any, model: str | None) -> None:
    config = render_compose("gpu", **({"GENERATOR_MODEL": model} if model else {}))
    services = config["services"]
    expected = model or "mmedrag-llava"
    assert environment(services["router"])["MMEDRAG_ROUTER_GENERATOR_MODEL"] == expected
    assert flag_values(services["vllm"]["command"])["--served-model-name"] == expected
    cpu = render_compose("cpu", **({"GENERATOR_MODEL": model} if model else {}))["services"]
    assert environment(cpu["generator-cpu"])["MMEDRAG_GENERATOR_SERVED_MODEL_NAME"] == expected


def test_generator_api_key_is_shared(render_compose: Any) -> None:
    services = render_compose("gpu", GENERATOR_API_KEY="s3cret")["services"]
    assert environment(services["vllm"])["VLLM_API_KEY"] == "s3cret"
    assert environment(services["router"])["MMEDRAG_ROUTER_GENERATOR_API_KEY"] == "s3cret"
    cpu = render_compose("cpu", GENERATOR_API_KEY="s3cret")["services"]
    assert environment(cpu["generator-cpu"])["MMEDRAG_GENERATOR_API_KEY"] == "s3cret"
    # unset: vLLM requires no key (empty), the router sends vLLM's conventional placeholder
    default = render_compose("gpu")["services"]
    assert environment(default["vllm"])["VLLM_API_KEY"] == ""
    assert environment(default["router"])["MMEDRAG_ROUTER_GENERATOR_API_KEY"] == "EMPTY"


def _vllm_api_keys(vllm: dict[str, Any]) -> list[str]:
    """The values after vLLM's --api-key (a list; vLLM drops empty ones and reads it before VLLM_API_KEY)."""
    command = [str(arg) for arg in vllm["command"]]
    start = command.index("--api-key") + 1
    end = next((i for i in range(start, len(command)) if command[i].startswith("--")), len(command))
    return [key for key in command[start:end] if key]


@pytest.mark.parametrize(
    ("env", "keys"),
    [
        ({}, []),
        ({"MMEDRAG_INTERNAL_TOKEN": "t0ken"}, ["t0ken"]),
        ({"MMEDRAG_INTERNAL_TOKEN": "t0ken", "GENERATOR_API_KEY": "s3cret"}, ["s3cret", "t0ken"]),
    ],
)
def test_vllm_accepts_what_the_router_sends(
    render_compose: Any, env: dict[str, str], keys: list[str]
) -> None:
    """The router sends GENERATOR_API_KEY when set, else the internal token: vLLM accepts either."""
    services = render_compose("gpu", **env)["services"]
    assert _vllm_api_keys(services["vllm"]) == keys
    for name in ("router", "classifier", "retriever"):
        assert environment(services[name])["MMEDRAG_INTERNAL_TOKEN"] == env.get("MMEDRAG_INTERNAL_TOKEN")


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_service_variables_exist_in_its_settings(compose_source: dict[str, Any], service: str) -> None:
    """No dead or misspelled MMEDRAG_* variable in any service of ours."""
    names = {n for n in environment(compose_source["services"][service]) if n.startswith("MMEDRAG_")}
    unknown = names - settings_env(SERVICE_SETTINGS[service])
    assert not unknown, f"{service}: not a setting of the service: {sorted(unknown)}"


@pytest.mark.parametrize("service", ["router", "classifier", "retriever", "generator-cpu"])
def test_every_setting_reaches_its_service(compose_source: dict[str, Any], service: str) -> None:
    """Each setting is fixed by the compose file or passed through from .env (a bare name)."""
    names = set(environment(compose_source["services"][service]))
    expected = settings_env(SERVICE_SETTINGS[service])
    if service == "router":
        expected.discard("MMEDRAG_ARTIFACTS")  # the router loads no artifacts
    assert expected <= names, f"{service}: not passed: {sorted(expected - names)}"


def test_start_order_uses_health_and_completion(compose_source: dict[str, Any]) -> None:
    services = compose_source["services"]
    assert services["index"]["depends_on"] == {"qdrant": {"condition": "service_healthy"}}
    assert services["retriever"]["depends_on"] == {
        "qdrant": {"condition": "service_healthy"},
        "index": {"condition": "service_completed_successfully"},
    }
    assert services["router"]["depends_on"] == {
        "classifier": {"condition": "service_healthy"},
        "retriever": {"condition": "service_healthy"},
    }
    assert services["index"]["restart"] == "no"


def test_long_running_services_have_healthchecks(compose_source: dict[str, Any]) -> None:
    paths = {"qdrant": "/readyz", "vllm": "/health", "generator-cpu": "/health"}
    ports = {"classifier": 8001, "retriever": 8002, "router": 8000}
    for name in LONG_RUNNING:
        test = " ".join(compose_source["services"][name]["healthcheck"]["test"])
        if name in ports:
            assert f"http://127.0.0.1:{ports[name]}/readyz" in test, name
        else:
            assert paths[name] in test, name


def test_index_job_loads_the_corpora_into_qdrant(render_compose: Any) -> None:
    services = render_compose("cpu")["services"]
    index = services["index"]
    script = " ".join(index["command"])
    assert "python -m mmedrag.cli index" in script
    for option in ("--domain", "--data", "--artifacts /artifacts", "--qdrant-url"):
        assert option in script
    assert "/artifacts/medsynth" in script
    qdrant_url = environment(index)["MMEDRAG_RETRIEVER_QDRANT_URL"]
    assert (
        qdrant_url
        == environment(services["retriever"])["MMEDRAG_RETRIEVER_QDRANT_URL"]
        == "http://qdrant:6333"
    )


def test_the_index_options_exist() -> None:
    """The options the job passes are options of `mmedrag index` (training/index.py index_cli)."""
    import typer

    from training.index import index_cli

    app = typer.Typer()
    app.command()(index_cli)
    options = {opt for param in typer.main.get_command(app).params for opt in param.opts}
    assert {"--domain", "--data", "--artifacts", "--qdrant-url"} <= options


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_our_containers_are_hardened(compose_source: dict[str, Any], service: str) -> None:
    spec = compose_source["services"][service]
    assert spec["user"] == "1000:1000"
    assert spec["read_only"] is True
    assert "no-new-privileges:true" in spec["security_opt"]
    assert spec["cap_drop"] == ["ALL"]
    for volume in spec.get("volumes", []):
        assert volume.endswith(":ro"), f"{service}: {volume} must be read-only"


def test_images_are_pinned(render_compose: Any) -> None:
    for profile in ("cpu", "gpu"):
        for name, service in render_compose(profile)["services"].items():
            image = service["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
            assert tag and tag != "latest", f"{name}: {image} is not pinned"


def test_service_commands_are_importable_modules(compose_source: dict[str, Any]) -> None:
    """`python -m <command>` (the image's ENTRYPOINT) finds each module."""
    import importlib.util

    for name in ("classifier", "retriever", "router", "generator-cpu"):
        (module,) = compose_source["services"][name]["command"]
        assert importlib.util.find_spec(module) is not None, module
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module


# ---------------------------------------------------------------------------------------------- .env


ENV_EXAMPLE = REPO / ".env.example"
ASSIGNMENT = re.compile(r"^#?\s?([A-Z][A-Z0-9_]*)=", re.MULTILINE)
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)")


def compose_variables() -> set[str]:
    """Variables docker-compose.yml interpolates (``${NAME...}``; ``$${...}`` is the container's shell)."""
    return set(INTERPOLATION.findall(COMPOSE_FILE.read_text(encoding="utf-8")))


def passed_through(compose_source: dict[str, Any]) -> set[str]:
    return {
        name
        for service in compose_source["services"].values()
        for name, value in environment(service).items()
        if value is None
    }


def test_env_example_documents_every_variable(compose_source: dict[str, Any]) -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    documented = set(ASSIGNMENT.findall(text))
    missing = (compose_variables() | passed_through(compose_source)) - documented
    assert not missing, f".env.example does not document {sorted(missing)}"
    all_settings = set().union(*(env_names(cls) for _, cls in _settings_classes()))
    not_mentioned = {name for name in all_settings if not re.search(rf"\b{name}\b", text)}
    assert not not_mentioned, f".env.example does not mention {sorted(not_mentioned)}"


def test_env_example_has_no_dead_variables(compose_source: dict[str, Any]) -> None:
    """Each variable .env.example offers is used by docker-compose.yml (or by Compose itself)."""
    documented = set(ASSIGNMENT.findall(ENV_EXAMPLE.read_text(encoding="utf-8")))
    used = compose_variables() | passed_through(compose_source) | {"COMPOSE_PROFILES"}
    assert documented - used == set()


def test_env_example_defaults_match_the_settings() -> None:
    """A commented `# NAME=value` line shows the service's real default."""
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    checked = 0
    for _, cls in _settings_classes():
        for field_name, field in cls.model_fields.items():
            name = env_name(cls, field_name)
            match = re.search(rf"^# {name}=(.*)$", text, re.MULTILINE)
            if match is None:
                continue
            default = field.default
            shown = (
                "" if default is None else ",".join(default) if isinstance(default, tuple) else str(default)
            )
            assert match.group(1) == shown, name
            checked += 1
    assert checked > 30


def test_env_example_profile_is_valid(compose_cmd: list[str]) -> None:
    """The file as shipped is a valid .env: compose accepts it and its profile."""
    values = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    assert values["COMPOSE_PROFILES"] in {"gpu", "cpu"}
    result = run([*compose_cmd, "config", "-q"], env=compose_env(**values))
    assert result.returncode == 0, result.stderr
