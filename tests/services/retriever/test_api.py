"""``POST /retrieve`` in-process (httpx.ASGITransport) over the session's tiny artifacts."""

from __future__ import annotations

import io
import math

import httpx
import pytest
from PIL import Image

from services.retriever.app import build_app
from services.retriever.selection import select_paper, select_ratio
from services.retriever.service import RetrieverService
from services.retriever.settings import RetrieverSettings
from training.data.records import DOMAINS

pytestmark = pytest.mark.anyio


def png_bytes(size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (90, 90, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def client_for(service: RetrieverService) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_app(service=service)), base_url="http://retriever"
    )


async def post(client: httpx.AsyncClient, image: bytes | None, **form: object) -> httpx.Response:
    files = {"image": ("image.png", image, "image/png")} if image is not None else None
    return await client.post("/retrieve", data={k: str(v) for k, v in form.items()}, files=files)


@pytest.fixture
async def client(retriever_service: RetrieverService):
    async with client_for(retriever_service) as client:
        yield client


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("domain", DOMAINS)
async def test_returns_k_max_ranked_contexts_from_the_domain_corpus(
    client, retriever_artifacts, retriever_service, domain
):
    response = await post(client, retriever_artifacts.image(domain), domain=domain, k_max=5)
    assert response.status_code == 200, response.text
    body = response.json()
    contexts = body["contexts"]
    assert body["domain"] == domain and body["collection"] == f"mmedrag_{domain}"
    assert body["strategy"] == "adaptive" and body["k_max"] == 5 and body["k_min"] == 1
    assert body["gamma"] == 0.05 and body["ratio_threshold"] is None  # no calibrated gamma: the default
    assert body["retriever"] == retriever_service.retrievers[domain].encoder.weights_sha256[:12]
    assert len(contexts) == 5
    assert [c["rank"] for c in contexts] == [1, 2, 3, 4, 5]
    scores = [c["score"] for c in contexts]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert body["k"] == select_paper(scores, gamma=0.05, k_max=5) >= 1
    assert [c["kept"] for c in contexts] == [i < body["k"] for i in range(5)]
    # Evidence comes from the chosen domain's corpus only.
    assert {c["text"] for c in contexts} <= retriever_artifacts.texts(domain)
    for other in set(DOMAINS) - {domain}:
        assert not {c["text"] for c in contexts} & retriever_artifacts.texts(other)
    ids = {r.id for r in retriever_artifacts.corpora[domain]}
    assert all(
        c["id"] in ids and c["id"] in c["report_ids"] and set(c["report_ids"]) <= ids for c in contexts
    )
    assert {c["source"] for c in contexts} == {retriever_artifacts.corpora[domain][0].dataset}
    assert len({c["text"] for c in contexts}) == 5  # duplicates were stored once


async def test_k_max_defaults_to_ten_and_is_capped_by_the_corpus(client, retriever_artifacts):
    body = (await post(client, retriever_artifacts.image("radiology"), domain="radiology")).json()
    assert body["k_max"] == 10
    assert len(body["contexts"]) == len(retriever_artifacts.texts("radiology")) == 10
    body = (
        await post(client, retriever_artifacts.image("ophthalmology"), domain="ophthalmology", k_max=50)
    ).json()
    assert len(body["contexts"]) == len(retriever_artifacts.texts("ophthalmology")) < 50


async def test_strategies(client, retriever_artifacts):
    image = retriever_artifacts.image("pathology", 2)

    off = (await post(client, image, domain="pathology", k_max=6, strategy="off")).json()
    assert off["k"] == 0 and not any(c["kept"] for c in off["contexts"]) and len(off["contexts"]) == 6
    assert off["gamma"] is None

    fixed = (await post(client, image, domain="pathology", k_max=6, strategy="fixed")).json()
    assert fixed["k"] == 6 and all(c["kept"] for c in fixed["contexts"])

    ratio = (
        await post(client, image, domain="pathology", k_max=6, strategy="ratio", ratio_threshold=1.2)
    ).json()
    scores = [c["score"] for c in ratio["contexts"]]
    assert ratio["ratio_threshold"] == 1.2 and ratio["gamma"] is None
    assert ratio["k"] == select_ratio(scores, threshold=1.2, k_max=6)

    keep_all = (await post(client, image, domain="pathology", k_max=6, gamma=1000)).json()
    positives = sum(s > 0 for s in scores)
    assert keep_all["gamma"] == 1000 and keep_all["k"] == max(1, positives)  # only S <= 0 stops it

    cliff = (await post(client, image, domain="pathology", k_max=6, gamma=0, k_min=3)).json()
    assert cliff["k"] == 3 and cliff["k_min"] == 3  # gamma 0 cuts at the first decrease; k_min wins
    assert math.isclose(cliff["contexts"][0]["score"], scores[0], rel_tol=1e-6)  # same image, same hits


async def test_readyz_reports_the_loaded_domains(client):
    response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True and set(body["domains"]) == set(DOMAINS)
    assert body["store"].startswith("embedded store")


@pytest.mark.parametrize(
    ("form", "status", "param", "fragment"),
    [
        ({"domain": "dermatology"}, 400, "domain", "radiology, ophthalmology, pathology"),
        ({"domain": "radiology", "k_max": 0}, 400, "k_max", "greater than or equal to 1"),
        ({"domain": "radiology", "k_max": 51}, 400, "k_max", "between 1 and 50"),
        ({"domain": "radiology", "gamma": -0.5}, 400, "gamma", "greater than or equal to 0"),
        ({"domain": "radiology", "gamma": "nan"}, 400, "gamma", ""),
        ({"domain": "radiology", "ratio_threshold": 1}, 400, "ratio_threshold", "greater than 1"),
        ({"domain": "radiology", "k_min": -1}, 400, "k_min", "greater than or equal to 0"),
        ({"domain": "radiology", "k_min": 4, "k_max": 3}, 400, None, "k_min (4) must not exceed k_max (3)"),
        ({"domain": "radiology", "strategy": "best"}, 400, "strategy", "adaptive"),
        ({"domain": "radiology", "kmax": 3}, 400, "kmax", "Extra inputs"),
        ({}, 400, "domain", "'domain' is required"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(client, form, status, param, fragment):
    error = _error(await post(client, png_bytes(), **form), status)
    assert error["param"] == param
    assert fragment in error["message"]


async def test_image_errors(client):
    error = _error(await post(client, None, domain="radiology"), 400)
    assert error["param"] == "image" and "'image' is required" in error["message"]
    error = _error(await post(client, b"certainly not an image", domain="radiology"), 415)
    assert error["param"] == "image" and "PNG" in error["message"]
    error = _error(await post(client, png_bytes()[:60], domain="radiology"), 422)
    assert error["param"] == "image"


async def test_domain_not_served_here_is_404(retriever_service, retriever_artifacts):
    only = RetrieverService(
        RetrieverSettings(artifacts=retriever_artifacts.root, domains="radiology"),
        store=retriever_service.store,
    )
    only.load()
    async with client_for(only) as client:
        error = _error(await post(client, png_bytes(), domain="pathology"), 404)
        assert error["param"] == "domain" and "it serves: radiology" in error["message"]
        assert (await post(client, png_bytes(), domain="radiology")).status_code == 200
    only.close()
    assert retriever_service.store is not None and retriever_service.ready  # the shared store stays open


async def test_not_loaded_is_503(retriever_artifacts):
    service = RetrieverService(RetrieverSettings(artifacts=retriever_artifacts.root))
    async with client_for(service) as client:  # ASGITransport runs no lifespan: nothing is loaded
        assert (await client.get("/readyz")).status_code == 503
        error = _error(await post(client, png_bytes(), domain="radiology"), 503)
        assert error["code"] == "not_ready"
