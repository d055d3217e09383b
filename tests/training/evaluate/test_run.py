"""``mmedrag eval``: in-process on the tiny artifacts, over HTTP against the real router on fakes and a fake
router that fails some requests; files, per-item fields, metrics recomputed from the per-item file."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from mmedrag.errors import run_with_clean_errors
from services.common.artifacts import CLASSIFIER_DIR, GENERATOR_DIR, INDEX_DIR, RETRIEVERS_DIR
from services.common.errors import DependencyUnavailable
from training.data.records import DOMAINS
from training.evaluate import metrics as m
from training.evaluate.report import METRICS_FILE, PLOTS_DIR, REPORT_FILE, RESULTS_FILE, read_jsonl
from training.evaluate.run import (
    DECODINGS,
    EvalConfig,
    HttpBackend,
    InProcessBackend,
    RetrievalOptions,
    RunSpec,
    eval_app,
    evaluate,
    load_test_items,
)

LIMIT = 2
MAX_NEW_TOKENS = 6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ITEM_FIELDS = {
    "run",
    "model",
    "variant",
    "decoding",
    "task",
    "id",
    "domain",
    "image",
    "question",
    "truth",
    "routed_domain",
    "domain_confidence",
    "domain_source",
    "prediction",
    "answer",
    "correct",
    "yes_probability",
    "evidence",
    "k",
    "k_max",
    "gamma",
    "timings_ms",
    "warnings",
    "error",
}


def private_artifacts(tiny: Path, root: Path) -> Path:
    """The tiny artifacts with a private copy of the embedded store (it admits one client at a time)."""
    root.mkdir(parents=True)
    for part in (CLASSIFIER_DIR, RETRIEVERS_DIR, GENERATOR_DIR, "medsynth"):
        (root / part).symlink_to(tiny / part, target_is_directory=True)
    shutil.copytree(tiny / INDEX_DIR, root / INDEX_DIR)
    return root


def shared_retriever(root: Path) -> Path:
    """A shared (all-domain) retriever folder of tiny random weights, as `train retriever --domain all`."""
    from training.artifacts.clip import write_clip_artifact

    folder = root / "shared-retriever"
    write_clip_artifact(folder, config_name="tiny", seed=7)
    return folder


def flat(output: str) -> str:
    """Command output without the error panel's frame and line breaks."""
    return " ".join(output.replace("│", " ").split())


def cli_app() -> typer.Typer:
    """``mmedrag eval`` as the integrator mounts it."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.add_typer(eval_app, name="eval")

    @app.callback()
    def _root() -> None:
        """test root"""

    return app


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = private_artifacts(tiny_artifacts, tmp_path_factory.mktemp("eval") / "artifacts")
    shared_retriever(root)
    return root


@pytest.fixture(scope="module")
def evaluated(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One in-process evaluation through the command line: both tasks, every variant."""
    out = tmp_path_factory.mktemp("eval-out")
    args = ["eval", "--data", str(artifacts / "medsynth"), "--artifacts", str(artifacts), "--task", "both"]
    args += ["--out", str(out), "--limit", str(LIMIT), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    args += ["--threads", "2", "--no-meteor", "--misalignment"]
    for variant in ("no-retrieval", "fixed-k", "adaptive", "shared-retriever"):
        args += ["--variant", variant]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    assert "## Closed VQA" in result.output
    return out


# --------------------------------------------------------------------------------------------------
# In-process


def test_inprocess_writes_every_output(evaluated: Path, artifacts: Path) -> None:
    rows = read_jsonl(evaluated / RESULTS_FILE)
    items = {task: load_test_items(artifacts / "medsynth", task, limit=LIMIT) for task in ("vqa", "report")}
    assert len(rows) == 4 * (len(items["vqa"]) + len(items["report"]))
    for row in rows:
        assert set(row) == ITEM_FIELDS
        assert row["error"] is None and row["prediction"] is not None
        assert row["domain_source"] == "classifier" and row["routed_domain"] in DOMAINS
        assert row["timings_ms"]["total"] >= row["timings_ms"]["generate"] > 0
        if row["task"] == "vqa":
            assert row["answer"] in ("yes", "no") and isinstance(row["correct"], bool)
        else:
            assert row["answer"] == row["prediction"].strip() and row["correct"] is None
    runs = {(row["task"], row["run"]): [] for row in rows}
    for row in rows:
        runs[(row["task"], row["run"])].append(row)
    for (task, _), group in runs.items():
        assert [(r["domain"], r["id"]) for r in group] == [(i.domain, i.id) for i in items[task]]

    markdown = (evaluated / REPORT_FILE).read_text(encoding="utf-8")
    assert "| run | domain | n | acc | F1 | AUROC | avg | AUROC(P) | k mean | errors |" in markdown
    assert "| run | domain | n | BLEU | ROUGE-L | METEOR | avg | k mean | errors |" in markdown
    assert "| adaptive | overall | 6 |" in markdown
    plots = sorted(p.name for p in (evaluated / PLOTS_DIR).iterdir())
    assert plots == [
        "domains_report.png",
        "domains_vqa.png",
        "k_distribution.png",
        "latency.png",
        "misalignment.png",
        "runs_report.png",
        "runs_vqa.png",
    ]
    for name in plots:
        data = (evaluated / PLOTS_DIR / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_variants_retrieve_as_named(evaluated: Path) -> None:
    rows = read_jsonl(evaluated / RESULTS_FILE)
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    assert all(r["k"] == 0 and r["evidence"] == [] for r in by_variant["no-retrieval"])
    for row in by_variant["fixed-k"]:
        assert row["k"] == row["k_max"] == 3 and [e["kept"] for e in row["evidence"]] == [True] * 3
    for variant in ("adaptive", "shared-retriever"):
        for row in by_variant[variant]:
            kept = [e["kept"] for e in row["evidence"]]
            assert 1 <= row["k"] <= row["k_max"] == len(kept) == 10
            assert kept == [True] * row["k"] + [False] * (row["k_max"] - row["k"])  # a kept prefix
            scores = [e["score"] for e in row["evidence"]]
            assert scores == sorted(scores, reverse=True)
            assert row["gamma"] is not None
    # The shared retriever searches every domain's corpus; the domain retrievers only the routed one's.
    prefixes = {"radiology": "cxr-", "ophthalmology": "slo-", "pathology": "he-"}
    for row in by_variant["adaptive"]:
        assert all(e["id"].startswith(prefixes[row["routed_domain"]]) for e in row["evidence"])
    shared_ids = {e["id"].split("-")[0] for r in by_variant["shared-retriever"] for e in r["evidence"]}
    assert len(shared_ids) > 1
    # Each image is classified once: the same route in every run.
    routes = {(r["task"], r["id"]): r["routed_domain"] for r in by_variant["no-retrieval"]}
    assert all(routes[(r["task"], r["id"])] == r["routed_domain"] for r in rows)


def test_metrics_json_matches_the_per_item_file(evaluated: Path) -> None:
    rows = read_jsonl(evaluated / RESULTS_FILE)
    payload = json.loads((evaluated / METRICS_FILE).read_text(encoding="utf-8"))
    assert payload["backend"]["mode"] == "inprocess" and payload["tasks"] == ["vqa", "report"]
    assert len(payload["runs"]) == 8
    for summary in payload["runs"]:
        group = [r for r in rows if r["task"] == summary["task"] and r["run"] == summary["run"]]
        domains = [r["domain"] for r in group]
        truths = [r["truth"] for r in group]
        if summary["task"] == "vqa":
            predictions = [r["prediction"] for r in group]
            probabilities = [r["yes_probability"] for r in group]
            overall = m.vqa_metrics(predictions, truths, probabilities).to_dict()
            per_domain = m.vqa_metrics_by_domain(domains, predictions, truths, probabilities)
            assert overall["accuracy"] == pytest.approx(sum(r["correct"] for r in group) / len(group))
        else:
            texts = [r["answer"] for r in group]
            overall = m.report_metrics(texts, truths, meteor=False).to_dict()
            per_domain = m.report_metrics_by_domain(domains, texts, truths, meteor=False)
        assert summary["metrics"]["overall"] == pytest.approx(overall)
        assert summary["metrics"]["by_domain"] == {
            d: pytest.approx(v.to_dict()) for d, v in per_domain.items()
        }
        ks = [r["k"] for r in group]
        assert summary["k"]["mean"] == pytest.approx(sum(ks) / len(ks), abs=1e-3)
        assert sum(summary["k"]["histogram"].values()) == len(group) == summary["n"] == summary["n_ok"]
        routed = sum(r["routed_domain"] == r["domain"] for r in group) / len(group)
        assert summary["routing"]["accuracy"] == pytest.approx(routed, abs=1e-4)
    assert any("METEOR not computed" in note for note in payload["notes"])
    # --misalignment: the four runs of the evaluated model, per domain and overall.
    rates = payload["misalignment"]["generator"]
    assert set(rates["per_domain"]) == set(DOMAINS) and rates["model"] == str(
        Path(payload["backend"]["artifacts"]) / GENERATOR_DIR
    )
    assert rates["all"]["items"] == sum(r["items"] for r in rates["per_domain"].values())
    assert 0.0 <= rates["all"]["copy_reference"] <= 1.0
    assert (
        "| model | domain | items | copy-reference | over-reliance |" in (evaluated / REPORT_FILE).read_text()
    )


def test_generator_decoding_paths_agree(artifacts: Path) -> None:
    """Greedy through ``decode_batch`` equals the generator's own greedy path, log-probabilities too."""
    from training.evaluate.decoding import DECODINGS as DECODING_NAMES
    from training.evaluate.decoding import DecodingConfig
    from training.pairs.runner import GenerationRequest, InProcessGenerator

    assert DECODINGS == DECODING_NAMES
    items = load_test_items(artifacts / "medsynth", "vqa", ("pathology",), limit=2)
    requests = [GenerationRequest(item.path, item.prompt()) for item in items]
    generator = InProcessGenerator(artifacts / GENERATOR_DIR, max_new_tokens=4, threads=2, top_logprobs=20)
    own = generator.generate_full(requests)
    assert [g.text for g in own] == generator.generate(requests)
    assert generator.generate(requests, max_new_tokens=1) != generator.generate(requests)
    generator.decoding = DecodingConfig()
    delegated = generator.generate_full(requests)
    assert [g.text for g in delegated] == [g.text for g in own]
    for a, b in zip(own, delegated, strict=True):
        assert (
            set(a.first_token_logprobs) == set(b.first_token_logprobs) and len(a.first_token_logprobs) == 20
        )
        assert list(a.first_token_logprobs.values()) == pytest.approx(list(b.first_token_logprobs.values()))


def test_cli_decoding_baseline_on_the_base_model(artifacts: Path, tmp_path: Path) -> None:
    """``--decoding beam --model base``: the decoding reaches the generator, the base fallback is noted."""
    out = tmp_path / "beam"
    args = ["eval", "--data", str(artifacts / "medsynth"), "--artifacts", str(artifacts), "--task", "vqa"]
    args += ["--out", str(out), "--limit", "1", "--domain", "pathology", "--variant", "no-retrieval"]
    args += ["--model", "base", "--decoding", "beam", "--num-beams", "2", "--max-new-tokens", "3"]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    [row] = read_jsonl(out / RESULTS_FILE)
    assert (row["decoding"], row["model"], row["variant"], row["k"]) == ("beam", "base", "no-retrieval", 0)
    assert row["prediction"] is not None and row["error"] is None
    payload = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    assert payload["backend"]["decoding"] == "beam" and payload["settings"]["decoding"] == "beam"
    assert any("the base model is the generator folder" in note for note in payload["notes"])


def test_locked_store_names_the_running_stack(artifacts: Path) -> None:
    from services.retriever.store import VectorStore

    store = VectorStore.open(path=artifacts / INDEX_DIR, create=False)
    try:
        backend = InProcessBackend(artifacts, artifacts / "medsynth")
        with pytest.raises(DependencyUnavailable, match="mmedrag up") as caught:
            backend.retriever()
        assert "--url" in caught.value.message and caught.value.code == "store_locked"
    finally:
        store.close()


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = cli_app()
    missing = tmp_path / "nowhere"
    args = ["eval", "--data", str(missing), "--task", "vqa", "--out", str(tmp_path / "o"), "--artifacts"]
    assert run_with_clean_errors(app, [*args, str(tmp_path)], verbose=False) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(missing) in error and error.count("\n") == 1

    usage = CliRunner().invoke(app, ["eval", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert usage.exit_code == 2 and "--task" in usage.output
    http_only = [
        "eval",
        "--data",
        str(tmp_path),
        "--task",
        "vqa",
        "--out",
        str(tmp_path),
        "--url",
        "http://x",
    ]
    bad = CliRunner().invoke(app, [*http_only, "--variant", "shared-retriever"])
    assert bad.exit_code == 2 and "in-process only" in flat(bad.output)
    bad = CliRunner().invoke(app, [*http_only, "--decoding", "vcd"])
    assert bad.exit_code == 2 and "in-process only" in flat(bad.output)


# --------------------------------------------------------------------------------------------------
# HTTP


@pytest.fixture(scope="module")
def medsynth(tiny_artifacts: Path) -> Path:
    return tiny_artifacts / "medsynth"


def test_http_against_the_router(medsynth: Path) -> None:
    """The real router app on fake dependencies: forms, evidence, k and answers land in the results."""
    from router_fakes import FakeStack, build_router_app

    stack = FakeStack()
    backend = HttpBackend(
        "http://router",
        medsynth,
        options=RetrievalOptions(fixed_k=2),
        concurrency=2,
        max_new_tokens={"vqa": 5, "report": 7},
        transport=httpx.ASGITransport(app=build_router_app(stack)),
    )
    vqa = load_test_items(medsynth, "vqa", ("radiology",), limit=2)
    report = load_test_items(medsynth, "report", ("radiology",), limit=1)
    adaptive = backend.run(vqa, RunSpec("adaptive", "adaptive"), task="vqa")
    fixed = backend.run(report, RunSpec("fixed", "fixed-k"), task="report")
    off = backend.run(vqa, RunSpec("off", "no-retrieval"), task="vqa")

    assert [r.id for r in adaptive] == [item.id for item in vqa]
    for row in adaptive:
        assert row.error is None and row.answer == "yes" and row.prediction == stack.answer
        assert row.model == "mmedrag-llava" and row.routed_domain == "radiology"
        assert row.domain_source == "classifier" and row.domain_confidence == pytest.approx(0.9)
        assert row.k == 1 and [e.id for e in row.evidence] == ["radiology-0", "radiology-1", "radiology-2"]
        assert row.correct == (row.truth.lower().startswith("yes"))
        assert row.timings_ms["client_total"] > 0 and "generate" in row.timings_ms
        assert row.yes_probability is None
    assert fixed[0].k == 2 and fixed[0].answer == stack.answer and fixed[0].correct is None
    assert all(r.k == 0 and r.evidence == [] for r in off)

    forms = stack.retriever_forms
    assert len(forms) == 3  # two adaptive, one fixed; none for no-retrieval
    assert [f["strategy"] for f in forms].count("fixed") == 1
    assert next(f for f in forms if f["strategy"] == "fixed")["k_max"] == "2"
    assert all(body["temperature"] == 0 for body in stack.generator_bodies)
    assert sorted(body["max_tokens"] for body in stack.generator_bodies) == [5, 5, 5, 5, 7]


@pytest.fixture(scope="module")
def real_router(artifacts: Path, evaluated: Path) -> Iterator[Any]:
    """The real router over the real classifier, retriever and generator services on the same artifacts,
    all in this process (after ``evaluated``, which has released the embedded store)."""
    from services.classifier.app import build_app as classifier_app
    from services.classifier.service import DomainClassifier
    from services.classifier.settings import ClassifierSettings
    from services.common.http import ServiceClient
    from services.generator.app import build_app as generator_app
    from services.generator.service import GeneratorService
    from services.generator.settings import GeneratorSettings
    from services.retriever.app import build_app as retriever_app
    from services.retriever.service import RetrieverService
    from services.retriever.settings import RetrieverSettings
    from services.router.app import build_app as router_app
    from services.router.dependencies import ClassifierClient, GeneratorClient, RetrieverClient
    from services.router.service import RAGPipeline
    from services.router.settings import RouterSettings

    classifier = DomainClassifier(max_batch=1)
    classifier.load(artifacts)
    retriever = RetrieverService(RetrieverSettings(artifacts=artifacts))
    retriever.load()
    generator = GeneratorService(artifacts / GENERATOR_DIR, max_tokens_ceiling=64, torch_threads=2)
    generator.load()
    apps = {
        "classifier": classifier_app(ClassifierSettings(artifacts=artifacts), service=classifier),
        "retriever": retriever_app(service=retriever),
        "generator": generator_app(GeneratorSettings(model_dir=artifacts / GENERATOR_DIR), service=generator),
    }

    def client(name: str) -> ServiceClient:
        transport = httpx.ASGITransport(app=apps[name])
        return ServiceClient(name, f"http://{name}", timeout_s=60, retries=0, transport=transport)

    settings = RouterSettings(auth_enabled=False, retries=0)
    pipeline = RAGPipeline(
        settings,
        ClassifierClient(client("classifier")),
        RetrieverClient(client("retriever")),
        GeneratorClient(
            "http://generator/v1",
            model="mmedrag-llava",
            api_key="EMPTY",
            timeout_s=60,
            http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=apps["generator"])),
        ),
    )
    try:
        yield router_app(settings, pipeline)
    finally:
        retriever.close()


def test_http_through_the_real_stack_matches_in_process(
    real_router: Any, evaluated: Path, artifacts: Path
) -> None:
    """The same artifacts answer alike served (router → services) and in-process (the services' classes)."""
    data = artifacts / "medsynth"
    backend = HttpBackend(
        "http://router",
        data,
        concurrency=4,
        max_new_tokens={"vqa": MAX_NEW_TOKENS, "report": MAX_NEW_TOKENS},
        transport=httpx.ASGITransport(app=real_router),
    )
    inprocess = {(r["task"], r["run"], r["id"]): r for r in read_jsonl(evaluated / RESULTS_FILE)}
    compared = 0
    for task in ("vqa", "report"):
        items = load_test_items(data, task, limit=LIMIT)
        for variant in ("no-retrieval", "fixed-k", "adaptive"):
            for row in backend.run(items, RunSpec(variant, variant), task=task):
                local = inprocess[(task, variant, row.id)]
                assert row.error is None, row.error
                assert row.routed_domain == local["routed_domain"]
                assert (row.k, row.k_max) == (local["k"], local["k_max"])
                assert [e.id for e in row.evidence] == [e["id"] for e in local["evidence"]]
                assert [e.score for e in row.evidence] == pytest.approx(
                    [e["score"] for e in local["evidence"]]
                )
                assert row.prediction == local["prediction"] and row.answer == local["answer"]
                compared += 1
    assert compared == 3 * len(inprocess) // 4  # every in-process row but the shared-retriever ones


def _rag_body(index: int) -> dict[str, Any]:
    return {
        "answer": "no",
        "text": "No.",
        "domain": {"label": "pathology", "probabilities": {"pathology": 0.8}, "source": "classifier"},
        "evidence": [{"id": f"r{index}", "text": "t", "score": 0.5, "rank": 1, "source": "s", "kept": True}],
        "retrieval": {"mode": "adaptive", "k_max": 10, "k": 1, "gamma": 0.05},
        "model": "served",
        "timings_ms": {"total": 12.0},
        "request_id": f"req-{index}",
        "warnings": [],
    }


class FlakyRouter:
    """Counts requests in flight; answers 503 to every third request and drops one connection."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen = 0
        self.keys: set[str | None] = set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen += 1
        index = self.seen
        self.keys.add(request.headers.get("authorization"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)
        finally:
            self.in_flight -= 1
        if index == 5:
            raise httpx.ConnectError("connection refused", request=request)
        if index % 3 == 0:
            error = {"message": "busy", "type": "service_unavailable", "param": None, "code": "overloaded"}
            return httpx.Response(503, json={"error": error})
        return httpx.Response(200, json=_rag_body(index))


def test_http_is_bounded_and_records_errors(medsynth: Path, tmp_path: Path) -> None:
    router = FlakyRouter()
    backend = HttpBackend(
        "http://router",
        medsynth,
        api_key="secret-key",
        concurrency=3,
        transport=httpx.MockTransport(router),
    )
    config = EvalConfig(data=medsynth, out=tmp_path, tasks=("vqa",), limit=4, meteor=False)
    outcome = evaluate(config, backend)

    rows = read_jsonl(tmp_path / RESULTS_FILE)
    assert len(rows) == router.seen == 12
    assert router.max_in_flight == 3  # bounded, and actually concurrent
    assert router.keys == {"Bearer secret-key"}
    failed = [r for r in rows if r["error"] is not None]
    assert len(failed) == 5  # four 503s (requests 3, 6, 9, 12) and one dropped connection
    assert sorted((r["error"]["status"] or 0, r["error"]["code"]) for r in failed) == [
        (0, "connection_error"),
        *[(503, "overloaded")] * 4,
    ]
    assert all(r["prediction"] is None and r["answer"] is None for r in failed)
    summary = outcome.metrics["runs"][0]
    assert summary["n"] == 12 and summary["n_errors"] == 5
    assert {(e["status"], e["code"]): e["count"] for e in summary["errors"]} == {
        (503, "overloaded"): 4,
        (None, "connection_error"): 1,
    }
    # Failed items are scored as wrong answers: recomputed from the file, with no probabilities.
    predictions = [None if r["error"] else r["prediction"] for r in rows]
    expected = m.vqa_metrics(predictions, [r["truth"] for r in rows])
    assert summary["metrics"]["overall"] == pytest.approx(expected.to_dict())
    assert summary["metrics"]["overall"]["auroc_prob"] is None
    assert any("hard yes/no answers only" in note for note in outcome.metrics["notes"])
    markdown = (tmp_path / REPORT_FILE).read_text(encoding="utf-8")
    assert "4 × status 503 (overloaded)" in markdown and "1 × status none (connection_error)" in markdown
    assert (tmp_path / PLOTS_DIR / "latency.png").read_bytes().startswith(PNG_SIGNATURE)


def test_http_refuses_in_process_variants(medsynth: Path) -> None:
    backend = HttpBackend("http://router", medsynth, transport=httpx.MockTransport(FlakyRouter()))
    items = load_test_items(medsynth, "vqa", ("radiology",), limit=1)
    with pytest.raises(ValueError, match="in-process only"):
        backend.run(items, RunSpec("shared", "shared-retriever"), task="vqa")
