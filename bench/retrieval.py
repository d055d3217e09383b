"""Vector search: the embedded Qdrant store against exact search by matrix product, and the retriever's own
path (``VectorStore.search`` with its in-memory exact index), on synthetic corpora of 512-d embeddings.

    python bench/retrieval.py [--sizes 1000 10000 100000] [--queries 200] [--out bench/results]

For each corpus size the script fills a fresh embedded (on-disk) Qdrant collection in batches, then runs
the same queries, interleaved so that the machine's noise falls on every method alike, through:

- ``qdrant-embedded``: ``QdrantClient.query_points`` on the embedded store (the retriever's path before
  the exact index, and its path with ``MMEDRAG_RETRIEVER_EXACT_INDEX=off``);
- ``exact-matmul``: the bound: one float32 matrix-vector product (numpy ``@``, BLAS with its default
  threads) over normalised vectors, then ``np.argpartition`` (ids only, no payloads);
- ``exact-einsum``: the same product on the calling thread (``np.einsum``, no BLAS threads): on a busy
  machine, waking BLAS threads for a small product can cost more than the product itself;
  ``p50_vs_exact`` divides by the faster of the two bounds;
- ``vectorstore``: ``VectorStore.search`` with the exact index on (top-k, payloads read from Qdrant,
  ``Hit`` objects): what the retriever service runs by default on the embedded store.

Recall@k is measured against a float64 brute-force ground truth. The issue's targets are checked on the
ratios of one run: at 10k reports the retriever's path within 2x of the matrix product with recall@10 =
1.0; at 100k, its p50 under 30 ms. Results go to ``<out>/retrieval.json`` and ``<out>/retrieval.md``.

The embedded store commits every point to its sqlite file separately, which costs milliseconds per point
on a disk: the store is therefore built on tmpfs (``/dev/shm``) when there is one (``--store-dir`` to
choose). This affects writes only; searches run on the store's in-memory copy either way.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import models
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from services.retriever.store import VectorStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # a sibling module (bench/ is not a package)

COLLECTION = "mmedrag_bench"
NAMESPACE = uuid.UUID("0b9a3c5e-7a51-4f0e-9d55-62656e636831")
METHODS = ("qdrant-embedded", "exact-matmul", "exact-einsum", "vectorstore")
BOUNDS = ("exact-matmul", "exact-einsum")
TARGET_RATIO_SIZE, TARGET_RATIO = 10_000, 2.0
TARGET_P50_SIZE, TARGET_P50_MS = 100_000, 30.0


def emit(text: str = "") -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------ data


def make_corpus(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Random unit-free embeddings, clustered a little (40 topics) like report embeddings are."""
    topics = rng.standard_normal((40, dim)).astype(np.float32)
    corpus = topics[rng.integers(0, len(topics), n)] * 0.6
    corpus += rng.standard_normal((n, dim)).astype(np.float32)
    return corpus


def make_queries(corpus: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Queries near stored points (an image whose report is in the corpus), plus noise."""
    anchors = corpus[rng.integers(0, len(corpus), count)]
    return (anchors + rng.standard_normal(anchors.shape).astype(np.float32)).astype(np.float32)


def point_id(row: int) -> str:
    return str(uuid.uuid5(NAMESPACE, str(row)))


def payload(row: int) -> dict[str, Any]:
    """Shaped like `mmedrag index` payloads, with a report-length text."""
    text = f"Synthetic report {row}. " + "No acute cardiopulmonary abnormality is seen. " * 6
    return {
        "text": text,
        "domain": "radiology",
        "report_id": f"r{row}",
        "report_ids": [f"r{row}"],
        "dataset": "bench",
        "datasets": ["bench"],
        "split": "retriever_train",
        "splits": ["retriever_train"],
    }


def fill(store: VectorStore, corpus: np.ndarray, batch: int) -> float:
    """Create the collection and upsert ``corpus`` in batches; seconds taken."""
    with store.calls(COLLECTION) as client:
        if client.collection_exists(COLLECTION):
            client.delete_collection(COLLECTION)
        client.create_collection(
            COLLECTION,
            vectors_config=models.VectorParams(size=corpus.shape[1], distance=models.Distance.COSINE),
        )
    started = time.perf_counter()
    with tqdm(total=len(corpus), desc=f"upsert {len(corpus)}", unit="pt", leave=False) as bar:
        for start in range(0, len(corpus), batch):
            rows = range(start, min(start + batch, len(corpus)))
            points = [
                models.PointStruct(id=point_id(row), vector=corpus[row].tolist(), payload=payload(row))
                for row in rows
            ]
            with store.calls(COLLECTION) as client:
                client.upsert(COLLECTION, points=points, wait=True)
            bar.update(len(points))
    return time.perf_counter() - started


def ground_truth(corpus: np.ndarray, queries: np.ndarray, k: int, chunk: int = 20_000) -> np.ndarray:
    """Row indices of each query's k most cosine-similar corpus rows, in float64 (chunked: bounded memory)."""
    q = queries.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best_rows = np.zeros((len(q), 0), dtype=np.int64)
    best_scores = np.zeros((len(q), 0))
    for start in range(0, len(corpus), chunk):
        block = corpus[start : start + chunk].astype(np.float64)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        scores = np.concatenate([best_scores, q @ block.T], axis=1)
        rows = np.concatenate([best_rows, np.arange(start, start + len(block))[None, :].repeat(len(q), 0)], 1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, keep, 1)
        best_rows = np.take_along_axis(rows, keep, 1)
    return best_rows


class MatrixProduct:
    """The bound: normalised float32 matrix in memory, one matrix-vector product, argpartition."""

    def __init__(self, corpus: np.ndarray):
        self.matrix = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)

    def search(self, query: np.ndarray, k: int, *, einsum: bool = False) -> np.ndarray:
        q = (query / np.linalg.norm(query)).astype(np.float32)
        scores = np.einsum("ij,j->i", self.matrix, q) if einsum else self.matrix @ q
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        return top[np.argsort(-scores[top])]


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Timings:
    latencies_ms: list[float]
    recalls: list[float]

    def row(self) -> dict[str, float]:
        lat = np.asarray(self.latencies_ms)
        return {
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "mean_ms": float(lat.mean()),
            "recall@k": float(np.mean(self.recalls)),
        }


def measure(
    methods: dict[str, Callable[[np.ndarray], Sequence[str]]],
    queries: np.ndarray,
    truth: list[set[str]],
    k: int,
    warmup: int,
    label: str,
) -> dict[str, Timings]:
    """Each query through every method in turn (order rotated per query); latency and recall@k."""
    names = list(methods)
    for query in queries[:warmup]:
        for name in names:
            methods[name](query)
    results = {name: Timings([], []) for name in names}
    for i, query in enumerate(tqdm(queries, desc=f"search {label}", unit="q", leave=False)):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            ids = methods[name](query)
            results[name].latencies_ms.append((time.perf_counter() - started) * 1000)
            results[name].recalls.append(len(set(ids[:k]) & truth[i]) / k)
    return results


def run_size(store: VectorStore, n: int, args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    corpus = make_corpus(n, args.dim, rng)
    queries = make_queries(corpus, args.queries, rng)
    k = min(args.k, n)
    build_s = fill(store, corpus, args.batch)
    truth_rows = ground_truth(corpus, queries, k)
    truth = [{point_id(int(row)) for row in rows} for rows in truth_rows]
    ids = [point_id(row) for row in range(n)]

    started = time.perf_counter()
    index = store.prepare(COLLECTION)  # the service's start-up load
    load_s = time.perf_counter() - started
    assert index is not None and len(index) == n

    bound = MatrixProduct(corpus)
    client = store.client

    def qdrant(query: np.ndarray) -> list[str]:
        response = client.query_points(COLLECTION, query=query.tolist(), limit=k, with_payload=True)
        return [str(point.id) for point in response.points]

    def matmul(query: np.ndarray) -> list[str]:
        return [ids[row] for row in bound.search(query, k)]

    def einsum(query: np.ndarray) -> list[str]:
        return [ids[row] for row in bound.search(query, k, einsum=True)]

    def vectorstore(query: np.ndarray) -> list[str]:
        return [hit.id for hit in store.search(COLLECTION, query, k)]

    methods = {
        "qdrant-embedded": qdrant,
        "exact-matmul": matmul,
        "exact-einsum": einsum,
        "vectorstore": vectorstore,
    }
    results = measure(methods, queries, truth, k, args.warmup, str(n))
    exact_p50 = min(results[name].row()["p50_ms"] for name in BOUNDS)
    rows = []
    for name in METHODS:
        row: dict[str, Any] = {"reports": n, "method": name, **results[name].row()}
        row["p50_vs_exact"] = row["p50_ms"] / exact_p50
        row["build_s"] = build_s if name == "qdrant-embedded" else None
        row["load_s"] = load_s if name == "vectorstore" else None
        row["target"] = target(n, name, row)
        rows.append(row)
    with store.calls(COLLECTION) as writer:  # free the store's copy before the next size
        writer.delete_collection(COLLECTION)
    return rows


def target(n: int, method: str, row: dict[str, Any]) -> str:
    """The issue's goals, next to the row they are about."""
    checks = []
    if method == "vectorstore":
        if row["recall@k"] < 1.0:
            checks.append(f"FAIL recall {row['recall@k']:.4f} < 1.0")
        if n == TARGET_RATIO_SIZE:
            ok = row["p50_vs_exact"] <= TARGET_RATIO and row["recall@k"] == 1.0
            checks.append(f"{'pass' if ok else 'FAIL'}: <= {TARGET_RATIO:g}x exact, recall 1.0")
        if n == TARGET_P50_SIZE:
            ok = row["p50_ms"] < TARGET_P50_MS
            checks.append(f"{'pass' if ok else 'FAIL'}: p50 < {TARGET_P50_MS:g} ms")
    if method == "qdrant-embedded" and n == TARGET_RATIO_SIZE:
        checks.append(f"{'within' if row['p50_vs_exact'] <= TARGET_RATIO else 'outside'} 2x (before)")
    return "; ".join(checks)


# ------------------------------------------------------------------------------------------ command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000], help="corpus sizes")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per size")
    parser.add_argument("--warmup", type=int, default=10, help="untimed queries first")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("-k", "--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--batch", type=int, default=1000, help="points per upsert")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: numpy's)")
    parser.add_argument(
        "--store-dir",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where the temporary embedded store is created (default: /dev/shm if present, else TMPDIR)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1 or args.queries < 1 or args.k < 1:
        parser.error("--sizes, --queries and --k must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    # qdrant-client warns past 20k points that local mode is not meant for large collections: measured here.
    warnings.filterwarnings("ignore", message="Local mode is not recommended")
    limits: Any = nullcontext()
    if args.threads:
        limits = threadpool_limits(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="mmedrag-bench-", dir=args.store_dir))
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        with limits:
            store = VectorStore.open(path=folder / "index", exact_index="on")
            try:
                for n in args.sizes:
                    size_rows = run_size(store, n, args, rng)
                    rows += size_rows
                    emit(markdown_table(size_rows))
                    emit()
            finally:
                store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    meta = {
        "queries": args.queries,
        "k": args.k,
        "dim": args.dim,
        "store": "embedded qdrant-client local mode (on-disk, " + str(args.store_dir or "TMPDIR") + ")",
        "threads": args.threads or "numpy default",
        "seconds": round(time.perf_counter() - started, 1),
    }
    notes = [
        "p50_vs_exact: p50 latency / the lower p50 of exact-matmul and exact-einsum, same run "
        "(queries interleaved).",
        "build_s: upserting the corpus into the embedded store; load_s: loading the exact index from it.",
        "recall@k: against a float64 brute-force ground truth.",
    ]
    json_path, md_path = write_results("retrieval", rows, args.out, meta=meta, notes=notes)
    emit(f"## retrieval ({', '.join(f'{key} {value}' for key, value in meta.items())})")
    emit()
    emit(markdown_table(rows))
    emit()
    emit(f"wrote {json_path} and {md_path}")
    failed = [row for row in rows if "FAIL" in row["target"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
