"""Static batching in the generator: waiting requests share one ``generate``, each answer is unchanged.

Greedy answers of a batch must equal the one-at-a-time answers token for token, whatever their prompt
lengths (left padding), ``max_tokens``, stop strings and logprobs. Sampling parameters decide who may share.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from services.common.prompts import build_vqa_prompt
from services.generator.service import Generation, GeneratorService, SamplingParams
from services.generator.settings import GeneratorSettings

QUESTIONS = [
    build_vqa_prompt("Is there a pleural effusion?", "radiology", ["Small left effusion."]),
    "Describe the image.",
    build_vqa_prompt("Is the heart enlarged?", "radiology", ["The heart is enlarged.", "No effusion."]),
    "Is there a nodule?",
]


def conversation(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def image(shade: int) -> Image.Image:
    picture = Image.new("RGB", (64, 64), (shade, shade, shade))
    picture.paste((255 - shade, 40, 40), (8, 8, 30 + shade // 10, 40))
    return picture


def params(max_tokens: int = 8, **fields: object) -> SamplingParams:
    values: dict = {
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": None,
        "stop": (),
        "logprobs": False,
        "top_logprobs": 0,
    }
    return SamplingParams(**{**values, **fields})


def service_for(
    folder: Path, max_batch: int, max_wait_s: float = 5.0
) -> tuple[GeneratorService, CollectorRegistry]:
    service = GeneratorService(
        folder, max_tokens_ceiling=64, torch_threads=1, max_batch=max_batch, max_wait_s=max_wait_s
    )
    service.load()
    registry = CollectorRegistry()
    service.attach_metrics(registry)
    return service, registry


def run_together(service: GeneratorService, requests: list[tuple]) -> list[Generation]:
    """Each request from its own thread, all at once (as the API's worker threads call it)."""
    results: list[Generation | None] = [None] * len(requests)

    def call(i: int) -> None:
        results[i] = service.generate(*requests[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def batches(registry: CollectorRegistry) -> tuple[float, float]:
    labels = {"service": "generator", "batcher": "generate"}
    count = registry.get_sample_value("mmedrag_batch_size_count", labels) or 0.0
    return count, registry.get_sample_value("mmedrag_batch_size_sum", labels) or 0.0


@pytest.fixture(scope="module")
def alone(generator_folder: Path) -> GeneratorService:
    service, _ = service_for(generator_folder, max_batch=1)
    return service


def test_greedy_batch_equals_one_at_a_time(generator_folder: Path, alone: GeneratorService) -> None:
    full = alone.generate(conversation(QUESTIONS[1]), image(30), params(12)).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()
    requests = [
        (conversation(QUESTIONS[0]), image(10), params(8)),
        (conversation(QUESTIONS[1]), image(30), params(12, stop=(stop,))),  # stops mid-way
        (conversation(QUESTIONS[2]), image(200), params(3, logprobs=True, top_logprobs=2)),
        (conversation(QUESTIONS[3]), image(120), params(16)),
    ]
    expected = [alone.generate(*request) for request in requests]
    service, registry = service_for(generator_folder, max_batch=len(requests))
    got = run_together(service, requests)

    assert batches(registry) == (1, len(requests))  # one generate call for the four
    assert len({g.prompt_tokens for g in expected}) > 1  # prompts of different lengths: padding mattered
    for together, one in zip(got, expected, strict=True):
        assert together.text == one.text
        assert together.finish_reason == one.finish_reason
        assert (together.prompt_tokens, together.completion_tokens) == (
            one.prompt_tokens,
            one.completion_tokens,
        )
    assert got[1].finish_reason == "stop" and got[1].text == full[: full.find(stop)]
    assert [g.completion_tokens for g in (got[0], got[2], got[3])] == [8, 3, 16]
    assert got[0].logprobs is None and got[2].logprobs is not None
    assert [entry.token for entry in got[2].logprobs] == [entry.token for entry in expected[2].logprobs]
    assert [e.logprob for e in got[2].logprobs] == pytest.approx(
        [e.logprob for e in expected[2].logprobs], abs=1e-4
    )
    assert all(len(entry.top_logprobs) == 2 for entry in got[2].logprobs)


def test_only_requests_with_the_same_sampling_parameters_share_a_batch(
    generator_folder: Path, alone: GeneratorService
) -> None:
    seeded = params(6, temperature=1.5, seed=7)
    requests = [
        (conversation(QUESTIONS[0]), image(10), params(6)),
        (conversation(QUESTIONS[1]), image(30), seeded),
        (conversation(QUESTIONS[2]), image(50), params(6)),
        (conversation(QUESTIONS[3]), image(70), seeded),
    ]
    service, registry = service_for(generator_folder, max_batch=4, max_wait_s=0.01)
    jobs = [service.prepare(*request) for request in requests]
    got = service.batcher.submit_blocking(jobs)  # all four queued at once
    # the two greedy ones together; each seeded one alone (its sample must not depend on neighbours)
    assert batches(registry) == (3, 4)
    for together, request in zip(got, requests, strict=True):
        assert together.text == alone.generate(*request).text
    assert got[1].text == got[3].text != got[0].text  # same seed, same sample


def test_waiting_requests_are_counted_in_the_queue_metrics(generator_folder: Path) -> None:
    service, registry = service_for(generator_folder, max_batch=2, max_wait_s=5.0)
    assert service.waiting == 0
    first = threading.Thread(target=service.generate, args=(conversation(QUESTIONS[0]), image(10), params(2)))
    first.start()  # one of two: its batch waits for a partner
    deadline = time.monotonic() + 30
    while service.waiting != 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    labels = {"service": "generator", "batcher": "generate"}
    assert registry.get_sample_value("mmedrag_batch_queue_depth", labels) == 1
    assert service.generate(conversation(QUESTIONS[1]), image(20), params(2)).completion_tokens == 2
    first.join(30)
    assert batches(registry) == (1, 2)
    assert service.waiting == 0 and service.running == 0


def test_max_batch_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch, generator_folder: Path) -> None:
    monkeypatch.setenv("MMEDRAG_GENERATOR_MAX_BATCH", "1")
    monkeypatch.setenv("MMEDRAG_GENERATOR_MAX_WAIT_MS", "20")
    service = GeneratorService.from_settings(GeneratorSettings(model_dir=generator_folder))
    assert not service.batcher.enabled and service.batcher.max_wait_s == pytest.approx(0.02)
    monkeypatch.setenv("MMEDRAG_GENERATOR_MAX_BATCH", "16")
    assert (
        GeneratorService.from_settings(GeneratorSettings(model_dir=generator_folder)).batcher.max_batch == 16
    )
