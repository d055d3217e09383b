"""``mmedrag status``: is each service alive and ready, and which artifacts are on disk, as readable tables.

It asks what an operator would ask by hand: ``/healthz`` (process alive) and ``/readyz`` (models loaded,
dependencies reachable) of the router, classifier and retriever, and the generator's ``/health`` (the path
vLLM answers, 503 while loading). The services are asked concurrently with a short timeout, so a hung
service costs one timeout, not one per service. The artifacts part reads ``manifest.json``: what was built,
with which seed, and the checksum of every weights file (``--verify`` recomputes them).

The exit status is 0 only when every service is ready (and, with ``--verify``, every checksum matches), so
scripts and CI can poll it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from services.common.artifacts import BUILD_HINT, MANIFEST, ArtifactError, read_manifest, sha256_file

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 3.0
CHECKSUM_PREFIX = 12
# Manifest keys of a part that map a file name to its sha256.
CHECKSUM_KEYS = ("weights", "checksums", "sha256", "files")
MANIFEST_FACTS = ("kind", "seed", "version", "built_by", "build_seconds")


@dataclass(frozen=True)
class ServiceTarget:
    """Where one service is and which paths tell its state."""

    name: str
    url: str  # base URL, no trailing slash
    ready_path: str
    health_path: str | None = None  # None: any answer on ready_path proves the process is alive


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    url: str
    alive: bool
    ready: bool
    detail: str


@dataclass(frozen=True)
class ArtifactFile:
    name: str
    sha256: str
    verified: str | None = None  # with --verify: "ok", "mismatch" or "missing"


@dataclass(frozen=True)
class ArtifactPart:
    name: str  # "classifier", "retrievers/radiology", ...
    path: str
    files: list[ArtifactFile] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)  # other manifest entries, e.g. collections


@dataclass(frozen=True)
class ArtifactSummary:
    root: Path
    problem: str | None = None  # why no manifest could be read
    facts: dict[str, str] = field(default_factory=dict)
    parts: list[ArtifactPart] = field(default_factory=list)

    @property
    def verified_ok(self) -> bool:
        """Every recomputed checksum matched (vacuously true without --verify)."""
        return self.problem is None and all(
            f.verified in (None, "ok") for part in self.parts for f in part.files
        )


# ------------------------------------------------------------------------------------------ services


def _derived(url: str, offset: int) -> str:
    """The same scheme and host as ``url``, on its port plus ``offset`` (how ``mmedrag up`` lays them out)."""
    base = httpx.URL(url)
    port = base.port or (443 if base.scheme == "https" else 80)
    host = f"[{base.host}]" if ":" in base.host else base.host
    return f"{base.scheme}://{host}:{port + offset}"


def _generator_base(url: str) -> str:
    """vLLM's base URL is usually given with ``/v1`` (as the router's setting is); /health is above it."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def service_targets(
    url: str = DEFAULT_URL,
    *,
    router: str | None = None,
    classifier: str | None = None,
    retriever: str | None = None,
    generator: str | None = None,
) -> list[ServiceTarget]:
    """The router at ``url`` and the others on its next three ports, unless a URL is given for them."""
    return [
        ServiceTarget("router", (router or url).rstrip("/"), "/readyz", "/healthz"),
        ServiceTarget("classifier", (classifier or _derived(url, 1)).rstrip("/"), "/readyz", "/healthz"),
        ServiceTarget("retriever", (retriever or _derived(url, 2)).rstrip("/"), "/readyz", "/healthz"),
        ServiceTarget("generator", _generator_base(generator or _derived(url, 3)), "/health"),
    ]


def _unreachable(exc: httpx.HTTPError, timeout_s: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, httpx.ConnectError):
        return "not reachable (nothing listening there, or the host is down)"
    return f"request failed: {type(exc).__name__}: {exc}"


def _describe(response: httpx.Response, path: str) -> str:
    """A short line from a readiness body: dependencies, model, domains, or the error message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return "" if response.status_code == 200 else f"{path} answered {response.status_code}"
    parts: list[str] = []
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        parts.append(str(error["message"]))
    if body.get("reason"):
        parts.append(str(body["reason"]))
    dependencies = body.get("dependencies")
    if isinstance(dependencies, dict):
        parts.append(", ".join(f"{name} {'ok' if ok else 'DOWN'}" for name, ok in dependencies.items()))
    if body.get("model"):
        parts.append(f"model {body['model']}")
    domains = body.get("domains")
    if isinstance(domains, dict | list) and domains:
        parts.append("domains " + ", ".join(domains))
    if body.get("status") not in (None, "ok"):
        parts.append(str(body["status"]))
    if not parts and response.status_code != 200:
        parts.append(f"{path} answered {response.status_code}")
    return " · ".join(parts)


async def check_service(client: httpx.AsyncClient, target: ServiceTarget, timeout_s: float) -> ServiceStatus:
    """Liveness, then readiness, of one service; never raises on a network failure."""
    alive = True
    notes: list[str] = []
    if target.health_path is not None:
        try:
            health = await client.get(target.url + target.health_path)
        except httpx.HTTPError as exc:
            return ServiceStatus(target.name, target.url, False, False, _unreachable(exc, timeout_s))
        alive = health.status_code == 200
        if not alive:
            notes.append(f"{target.health_path} answered {health.status_code}")
    try:
        response = await client.get(target.url + target.ready_path)
    except httpx.HTTPError as exc:
        alive = alive and target.health_path is not None  # without a liveness path, no answer = down
        return ServiceStatus(target.name, target.url, alive, False, _unreachable(exc, timeout_s))
    detail = _describe(response, target.ready_path)
    if detail:
        notes.append(detail)
    ready = alive and response.status_code == 200
    return ServiceStatus(target.name, target.url, alive, ready, " · ".join(notes))


async def check_services(
    targets: Sequence[ServiceTarget],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[ServiceStatus]:
    """Every service's state, asked concurrently (``transport`` lets tests answer in-process)."""
    async with httpx.AsyncClient(timeout=timeout_s, transport=transport) as client:
        return list(await asyncio.gather(*(check_service(client, t, timeout_s) for t in targets)))


# ------------------------------------------------------------------------------------------ artifacts


def _fact(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return f"{len(value)} entries"
    return str(value)


def _part(name: str, entry: dict[str, Any], root: Path, verify: bool) -> ArtifactPart:
    path = str(entry.get("path", ""))
    files: list[ArtifactFile] = []
    facts: list[tuple[str, str]] = []
    for key, value in entry.items():
        if key == "path":
            continue
        if key in CHECKSUM_KEYS and isinstance(value, dict):
            for file_name, digest in value.items():
                verified = None
                if verify:
                    target = root / path / file_name
                    if not target.is_file():
                        verified = "missing"
                    else:
                        verified = "ok" if sha256_file(target) == str(digest) else "mismatch"
                files.append(ArtifactFile(str(file_name), str(digest), verified))
        else:
            facts.append((key, _fact(value)))
    return ArtifactPart(name, path, files, facts)


def _parts(parts: dict[str, Any], root: Path, verify: bool, prefix: str = "") -> list[ArtifactPart]:
    """Flatten ``parts``: an entry with a ``path`` is a part; a mapping of such entries is a group."""
    found: list[ArtifactPart] = []
    for key, entry in parts.items():
        name = f"{prefix}{key}"
        if not isinstance(entry, dict):
            found.append(ArtifactPart(name, "", facts=[("value", _fact(entry))]))
        elif "path" not in entry and entry and all(isinstance(v, dict) for v in entry.values()):
            found.extend(_parts(entry, root, verify, prefix=f"{name}/"))
        else:
            found.append(_part(name, entry, root, verify))
    return found


def read_artifacts(root: Path, *, verify: bool = False) -> ArtifactSummary:
    """What the manifest of ``root`` says was built; never raises on a missing or broken manifest."""
    if not (root / MANIFEST).is_file():
        return ArtifactSummary(root, problem=f"no {MANIFEST} in {root}; {BUILD_HINT.format(root=root)}")
    try:
        manifest = read_manifest(root)
    except ArtifactError as exc:
        return ArtifactSummary(root, problem=str(exc))
    facts = {key: _fact(manifest[key]) for key in MANIFEST_FACTS if key in manifest}
    parts = manifest.get("parts")
    return ArtifactSummary(
        root, facts=facts, parts=_parts(parts, root, verify) if isinstance(parts, dict) else []
    )


# ------------------------------------------------------------------------------------------ rendering

Style = Callable[[str], str]


def _plain(text: str) -> str:
    return text


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], styles: dict[int, Callable[[str], Style]]
) -> str:
    """Left-aligned columns, the last one free; ``styles[column](value)`` colours a cell after padding."""
    last = len(headers) - 1
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(last)] + [0]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    for row in rows:
        cells = []
        for i, (value, width) in enumerate(zip(row, widths, strict=True)):
            style = styles.get(i, lambda _: _plain)(value)
            cells.append(style(value if i == last else value.ljust(width)))
        lines.append("  " + "  ".join(cells))
    return "\n".join(line.rstrip() for line in lines)


def _state_style(value: str) -> Style:
    good = value in ("ok", "ready")
    bad = value in ("DOWN", "not ready", "mismatch", "missing")
    if not (good or bad):
        return _plain
    return lambda text: typer.style(text, fg="green" if good else "red", bold=bad)


def render_services(statuses: Sequence[ServiceStatus]) -> str:
    rows = [
        [s.name, s.url, "ok" if s.alive else "DOWN", "ready" if s.ready else "not ready", s.detail or "-"]
        for s in statuses
    ]
    table = _table(["SERVICE", "URL", "ALIVE", "READY", "DETAIL"], rows, {2: _state_style, 3: _state_style})
    return "Services\n" + table


def render_artifacts(summary: ArtifactSummary) -> str:
    title = f"Artifacts  {summary.root}"
    if summary.problem is not None:
        return f"{title}\n  {summary.problem}"
    lines = [f"{title}  ({MANIFEST})"]
    if summary.facts:
        lines.append(
            "  " + " · ".join(f"{key.replace('_', ' ')} {value}" for key, value in summary.facts.items())
        )
    if not summary.parts:
        lines.append("  the manifest lists no parts")
        return "\n".join(lines)
    name_width = max((len(f.name) for part in summary.parts for f in part.files), default=0)
    rows: list[list[str]] = []
    for part in summary.parts:
        contents = []
        for f in part.files:
            line = f"{f.name.ljust(name_width)}  sha256 {f.sha256[:CHECKSUM_PREFIX]}"
            if f.verified is not None:
                line += "  " + _state_style(f.verified)(f.verified)
            contents.append(line)
        contents += [f"{key.replace('_', ' ')}: {value}" for key, value in part.facts]
        for index, text in enumerate(contents or ["-"]):
            rows.append([part.name, part.path, text] if index == 0 else ["", "", text])
    lines.append(_table(["PART", "PATH", "CONTENTS"], rows, {}))
    return "\n".join(lines)


def status_report(statuses: Sequence[ServiceStatus], summary: ArtifactSummary) -> dict[str, Any]:
    """The JSON form of ``mmedrag status --json``."""
    artifacts = asdict(summary)
    artifacts["root"] = str(summary.root)
    return {
        "ready": all(s.ready for s in statuses),
        "services": [asdict(s) for s in statuses],
        "artifacts": artifacts,
    }


def _verdict(statuses: Sequence[ServiceStatus], summary: ArtifactSummary, verify: bool) -> tuple[int, str]:
    waiting = [s.name for s in statuses if not s.ready]
    lines = []
    if waiting:
        lines.append(f"{len(waiting)} of {len(statuses)} services not ready: {', '.join(waiting)}")
    else:
        lines.append(f"All {len(statuses)} services are ready.")
    failed = verify and not summary.verified_ok
    if failed:
        lines.append("Artifact checksums do not match the manifest (or the manifest is missing).")
    return (1 if waiting or failed else 0), "\n".join(lines)


# ------------------------------------------------------------------------------------------ command


def status_cli(
    url: Annotated[
        str,
        typer.Option(
            help="Router base URL; the classifier, retriever and generator are taken on its next three "
            "ports (as `mmedrag up` places them) unless given below."
        ),
    ] = DEFAULT_URL,
    router_url: Annotated[str | None, typer.Option(help="Router base URL (default: --url).")] = None,
    classifier_url: Annotated[
        str | None, typer.Option(help="Classifier base URL (default: --url port + 1).")
    ] = None,
    retriever_url: Annotated[
        str | None, typer.Option(help="Retriever base URL (default: --url port + 2).")
    ] = None,
    generator_url: Annotated[
        str | None,
        typer.Option(
            help="Generator (or vLLM) base URL; a trailing /v1 is ignored (default: --url port + 3)."
        ),
    ] = None,
    artifacts: Annotated[
        Path, typer.Option(envvar="MMEDRAG_ARTIFACTS", help="Artifacts folder whose manifest.json is shown.")
    ] = Path("artifacts"),
    verify: Annotated[
        bool, typer.Option("--verify", help="Recompute every weights checksum (reads each file in full).")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to wait for each service.")
    ] = DEFAULT_TIMEOUT_S,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Show each service's health and readiness and the loaded artifacts; exit 1 unless all are ready."""
    targets = service_targets(
        url, router=router_url, classifier=classifier_url, retriever=retriever_url, generator=generator_url
    )
    statuses = asyncio.run(check_services(targets, timeout_s=timeout))
    summary = read_artifacts(artifacts, verify=verify)
    code, verdict = _verdict(statuses, summary, verify)
    if as_json:
        typer.echo(json.dumps(status_report(statuses, summary), indent=2))
    else:
        typer.echo(f"{render_services(statuses)}\n\n{render_artifacts(summary)}\n")
        typer.echo(typer.style(verdict, fg="green" if code == 0 else "red", bold=True))
    raise typer.Exit(code)
