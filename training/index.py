"""``mmedrag index --domain D``: embed a domain's report corpus with its retriever and store it in Qdrant.

The retrieval corpus of a domain is the report text of its retriever-training split (DESIGN.md §5; for
Harvard-FairVLMed the ``gpt4_summary``), so it never overlaps the preference or test splits. Texts are
embedded with the retriever's text tower and stored in the collection ``mmedrag_<domain>`` (cosine
distance, vector size = the retriever's ``embed_dim``); the service later queries it with image
embeddings.

Guarantees:

- **One point per distinct text.** The point id is derived from the text alone (uuid5 of its sha256),
  and the payload lists every report id that shares the text (``report_ids``; ``report_id`` is the
  first), with their datasets and splits.
- **Idempotent and additive.** Indexing the same reports again changes nothing (texts already stored
  are not re-embedded); indexing more reports adds their texts and merges their ids into the payloads
  of texts already there.
- **One retriever per collection.** The sha256 of the retriever weights is stored in the collection's
  metadata (``retriever_sha256``). Adding to a collection built by another retriever would mix
  embedding spaces, so it is refused unless ``recreate=True`` (the collection is then rebuilt).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import typer
from qdrant_client import QdrantClient, models
from tqdm.auto import tqdm

from services.common.artifacts import INDEX_DIR, RETRIEVERS_DIR, collection_name
from services.retriever.store import DOMAIN_KEY, RETRIEVER_SHA256_KEY, VectorStore, index_command
from training.data.records import DOMAINS

logger = logging.getLogger(__name__)

# Namespace of the point ids: uuid5(POINT_NAMESPACE, sha256(text)). Never change it: ids would change.
POINT_NAMESPACE = uuid.UUID("6d1f7c1e-3b7a-5e55-9a52-6d6d65647261")
INDEX_FORMAT_VERSION = 1


class TextEncoder(Protocol):
    """What the indexer needs of a retriever (``services.common.clip.ClipModel`` is one)."""

    embed_dim: int
    weights_sha256: str

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class ReportToIndex:
    """One report of the corpus."""

    id: str
    text: str
    dataset: str
    split: str


@dataclass(frozen=True)
class IndexSummary:
    """What one indexing run did."""

    domain: str
    collection: str
    reports: int  # reports given
    skipped_empty: int  # reports whose text was blank
    unique_texts: int  # distinct texts among the given reports
    added: int  # points created (texts embedded) by this run
    updated: int  # points whose report ids were extended
    unchanged: int  # points already stored exactly so
    points: int  # points in the collection after the run
    retriever_sha256: str
    recreated: bool = False


def normalise_text(text: str) -> str:
    """The stored form of a report: surrounding blanks removed (they change no meaning)."""
    return text.strip()


def point_id(text: str) -> str:
    """Deterministic point id of a (normalised) report text."""
    return str(uuid.uuid5(POINT_NAMESPACE, hashlib.sha256(text.encode("utf-8")).hexdigest()))


@dataclass
class _TextGroup:
    text: str
    report_ids: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)

    def add(self, report_ids: Iterable[str], datasets: Iterable[str], splits: Iterable[str]) -> None:
        for target, values in (
            (self.report_ids, report_ids),
            (self.datasets, datasets),
            (self.splits, splits),
        ):
            for value in values:
                if value not in target:
                    target.append(value)

    def payload(self, domain: str) -> dict[str, Any]:
        return {
            "text": self.text,
            "domain": domain,
            "report_id": self.report_ids[0],
            "report_ids": list(self.report_ids),
            "dataset": self.datasets[0],
            "datasets": list(self.datasets),
            "split": self.splits[0],
            "splits": list(self.splits),
        }


def _group_by_text(reports: Sequence[ReportToIndex]) -> tuple[dict[str, _TextGroup], int]:
    groups: dict[str, _TextGroup] = {}
    skipped = 0
    for report in reports:
        text = normalise_text(report.text)
        if not text:
            skipped += 1
            continue
        groups.setdefault(point_id(text), _TextGroup(text)).add([report.id], [report.dataset], [report.split])
    return groups, skipped


def _prepare_collection(
    store: VectorStore, collection: str, domain: str, clip: TextEncoder, *, recreate: bool
) -> bool:
    """Create the collection, or check that it holds this retriever's embeddings; True if recreated."""
    metadata = {
        RETRIEVER_SHA256_KEY: clip.weights_sha256,
        DOMAIN_KEY: domain,
        "embed_dim": clip.embed_dim,
        "built_by": "mmedrag index",
        "format_version": INDEX_FORMAT_VERSION,
    }
    recreated = False
    if store.collection_exists(collection):
        if recreate:
            with store.calls(collection) as client:
                client.delete_collection(collection)
            recreated = True
        else:
            info = store.collection_info(collection)
            if info.retriever_sha256 != clip.weights_sha256:
                raise ValueError(
                    f"collection '{collection}' in {store.location} was built with retriever sha256 "
                    f"{info.retriever_sha256 or '(none recorded)'}, not with this retriever's "
                    f"{clip.weights_sha256}; mixing embeddings of two retrievers is refused: rebuild it "
                    f"with `{index_command(domain)} --recreate` (recreate=True)"
                )
            if info.vector_size != clip.embed_dim:
                raise ValueError(
                    f"collection '{collection}' stores vectors of size {info.vector_size}, the retriever "
                    f"embeds into {clip.embed_dim}; rebuild it with `{index_command(domain)} --recreate`"
                )
            return False
    with store.calls(collection) as client:
        client.create_collection(
            collection,
            vectors_config=models.VectorParams(size=clip.embed_dim, distance=models.Distance.COSINE),
            metadata=metadata,
        )
    return recreated


def index_reports(
    store_or_client: VectorStore | QdrantClient,
    domain: str,
    reports: Sequence[ReportToIndex],
    clip: TextEncoder,
    *,
    batch_size: int = 64,
    progress: bool = True,
    recreate: bool = False,
) -> IndexSummary:
    """Embed and store a domain's report texts; see the module docstring for the guarantees.

    Args:
        store_or_client: the vector store (or a bare ``QdrantClient``).
        domain: one of ``DOMAINS``; the collection is ``collection_name(domain)``.
        reports: the corpus (usually ``load_corpus_from_medsynth`` or ``load_corpus``).
        clip: the domain's retriever; its text tower embeds the reports.
        batch_size: distinct texts per embedding pass and per upsert.
        progress: show a tqdm bar.
        recreate: drop and rebuild the collection (needed when the retriever changed).

    Example::

        store = VectorStore.open(path=root / "index")
        clip = ClipModel.load(root / "retrievers" / "radiology", root=root)
        index_reports(store, "radiology", load_corpus_from_medsynth(data, "radiology"), clip)
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(store_or_client, VectorStore):
        store = store_or_client
    else:
        store = VectorStore(store_or_client, location="the given Qdrant client", embedded=False)
    collection = collection_name(domain)
    groups, skipped = _group_by_text(reports)
    recreated = _prepare_collection(store, collection, domain, clip, recreate=recreate)

    added = updated = unchanged = 0
    ids = list(groups)
    bar = tqdm(total=len(ids), desc=f"index {domain}", unit="text", disable=not progress)
    try:
        for start in range(0, len(ids), batch_size):
            batch_ids = ids[start : start + batch_size]
            with store.calls(collection) as client:
                stored = {
                    str(record.id): record
                    for record in client.retrieve(collection, batch_ids, with_payload=True, with_vectors=True)
                }
            new_ids = [pid for pid in batch_ids if pid not in stored]
            points: list[models.PointStruct] = []
            if new_ids:
                vectors = np.asarray(
                    clip.encode_texts([groups[pid].text for pid in new_ids]), dtype=np.float32
                )
                if vectors.shape != (len(new_ids), clip.embed_dim):
                    raise ValueError(
                        f"the retriever returned embeddings of shape {vectors.shape}, "
                        f"expected {(len(new_ids), clip.embed_dim)}"
                    )
                points += [
                    models.PointStruct(id=pid, vector=vector.tolist(), payload=groups[pid].payload(domain))
                    for pid, vector in zip(new_ids, vectors, strict=True)
                ]
                added += len(new_ids)
            for pid in batch_ids:
                if pid not in stored:
                    continue
                old = dict(stored[pid].payload or {})
                merged = _TextGroup(groups[pid].text)
                merged.add(old.get("report_ids", []), old.get("datasets", []), old.get("splits", []))
                merged.add(groups[pid].report_ids, groups[pid].datasets, groups[pid].splits)
                payload = {**old, **merged.payload(domain)}
                if payload == old:
                    unchanged += 1
                    continue
                points.append(models.PointStruct(id=pid, vector=stored[pid].vector, payload=payload))
                updated += 1
            if points:
                with store.calls(collection) as client:
                    client.upsert(collection, points=points, wait=True)
            bar.update(len(batch_ids))
    finally:
        bar.close()
    info = store.collection_info(collection)
    summary = IndexSummary(
        domain=domain,
        collection=collection,
        reports=len(reports),
        skipped_empty=skipped,
        unique_texts=len(groups),
        added=added,
        updated=updated,
        unchanged=unchanged,
        points=info.points_count,
        retriever_sha256=clip.weights_sha256,
        recreated=recreated,
    )
    logger.info("indexed %s", summary)
    return summary


# --------------------------------------------------------------------------------------------------
# Corpora


def load_corpus(
    path: Path,
    format_name: str,
    *,
    domain: str,
    dataset: str | None = None,
    expected_split: str | None = "retriever_train",
) -> list[ReportToIndex]:
    """The reports of one release file (a ``training.data.formats`` format), as a corpus.

    Images are not needed (nor checked): only the texts are indexed. With ``expected_split``, a record
    of another split is an error, since the corpus must never hold preference or test reports.
    """
    from training.data.formats import get_format

    path = Path(path)
    records = get_format(format_name).load(
        path, path.parent, check_images=False, dataset=dataset, domain=domain
    )
    corpus = []
    for record in records:
        if expected_split is not None and record.split != expected_split:
            raise ValueError(
                f"{path}: record {record.id!r} belongs to split {record.split!r}, not {expected_split!r}; "
                "the retrieval corpus must hold retriever-training reports only"
            )
        corpus.append(
            ReportToIndex(id=record.id, text=record.report, dataset=record.dataset, split=record.split)
        )
    return corpus


def load_corpus_from_medsynth(data_dir: Path, domain: str) -> list[ReportToIndex]:
    """A MedSynth folder's retrieval corpus of ``domain``: its retriever-train split's texts.

    Read through the release format the domain is written in (``RELEASE_FORMATS``), so the text is what
    the real loader gives (Harvard-FairVLMed: ``gpt4_summary``).
    """
    from training.data.medsynth.release import RELEASE_FORMATS, RETRIEVER_SPLITS, dataset_name

    if domain not in RELEASE_FORMATS:
        raise ValueError(f"domain must be one of {', '.join(RELEASE_FORMATS)}, got {domain!r}")
    path = Path(data_dir) / domain / RETRIEVER_SPLITS["retriever_train"]
    return load_corpus(path, RELEASE_FORMATS[domain][0], domain=domain, dataset=dataset_name(domain))


# --------------------------------------------------------------------------------------------------
# Command line


def build_index(
    artifacts: Path,
    domain: str,
    corpus: Sequence[ReportToIndex],
    *,
    qdrant_url: str | None = None,
    qdrant_api_key: str | None = None,
    recreate: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> IndexSummary:
    """Index ``corpus`` with ``<artifacts>/retrievers/<domain>`` into a server or ``<artifacts>/index``."""
    from services.common.clip import ClipModel

    artifacts = Path(artifacts)
    clip = ClipModel.load(artifacts / RETRIEVERS_DIR / domain, root=artifacts)
    store = VectorStore.open(url=qdrant_url, path=artifacts / INDEX_DIR, api_key=qdrant_api_key)
    try:
        return index_reports(
            store, domain, corpus, clip, batch_size=batch_size, progress=progress, recreate=recreate
        )
    finally:
        store.close()


def index_cli(
    domain: Annotated[
        str, typer.Option("--domain", help="Domain whose corpus to index: " + ", ".join(DOMAINS))
    ],
    data: Annotated[
        Path | None, typer.Option("--data", help="MedSynth folder (its retriever_train split is the corpus).")
    ] = None,
    corpus_file: Annotated[
        Path | None, typer.Option("--corpus", help="Or: a release file holding the retriever_train reports.")
    ] = None,
    corpus_format: Annotated[
        str | None, typer.Option("--format", help="Release format of --corpus (e.g. retriever-radiology).")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Dataset name of --corpus, if needed.")
    ] = None,
    artifacts: Annotated[
        Path, typer.Option("--artifacts", envvar="MMEDRAG_ARTIFACTS", help="Artifacts folder.")
    ] = Path("artifacts"),
    qdrant_url: Annotated[
        str | None,
        typer.Option(
            "--qdrant-url",
            envvar="MMEDRAG_RETRIEVER_QDRANT_URL",
            help="Qdrant server; default: the embedded store <artifacts>/index (stop the retriever first).",
        ),
    ] = None,
    qdrant_api_key: Annotated[
        str | None,
        typer.Option(envvar="MMEDRAG_RETRIEVER_QDRANT_API_KEY", hidden=True, help="Qdrant server API key."),
    ] = None,
    recreate: Annotated[bool, typer.Option("--recreate", help="Drop and rebuild the collection.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per embedding pass.")] = 64,
) -> None:
    """Embed a domain's report corpus with its retriever into the collection mmedrag_<domain>."""
    if data is not None and corpus_file is None:
        corpus = load_corpus_from_medsynth(data, domain)
    elif data is None and corpus_file is not None and corpus_format is not None:
        corpus = load_corpus(corpus_file, corpus_format, domain=domain, dataset=dataset)
    else:
        raise typer.BadParameter("give either --data (a MedSynth folder) or --corpus FILE with --format NAME")
    summary = build_index(
        artifacts,
        domain,
        corpus,
        qdrant_url=qdrant_url,
        qdrant_api_key=qdrant_api_key,
        recreate=recreate,
        batch_size=batch_size,
    )
    typer.echo(
        f"{summary.collection}: {summary.points} texts ({summary.added} added, {summary.updated} updated, "
        f"{summary.unchanged} unchanged) from {summary.reports} reports; "
        f"retriever {summary.retriever_sha256[:12]}"
    )
