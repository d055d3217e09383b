"""``mmedrag eval retrieval``: how well retrievers find the right reports, on MedSynth's test split.

This is the retrieval half of the paper's "+DR" (domain-aware retrieval) ablation. For each domain it
compares three retrievers on the same queries:

- **domain**: the domain's own retriever, ``<artifacts>/retrievers/<domain>``;
- **shared**: one retriever trained on all domains mixed (``--shared DIR``; the row is skipped with a
  note when not given), searched over the same per-domain corpus;
- **untrained**: a random initialisation of the domain retriever's architecture (open_clip config and
  preprocessing), built on the fly from a fixed seed: the floor any training must beat.

Metrics (both image → text, cosine similarity):

- **Recall@k** (k = 1, 5, 10): the gallery is the test split's own reports, one entry per distinct text
  (the index stores each text once, so identical reports are one candidate); a query image's positive is
  the text of its own report. Ties count against the query (a positive tied with another text is ranked
  after it), so a degenerate encoder cannot score by accident. With ``k >= gallery`` Recall@k is 1
  trivially: the table shows the gallery size.
- **Agreement@k** (k = 1, 5): retrieve from the domain's retrieval corpus (its retriever-train split,
  what ``mmedrag index`` stores) and measure how well the top-k reports' findings agree with the query's
  ground-truth findings (``finding_agreement``, averaged over the k ranks and over queries). This is what
  matters for generation: a report of another patient with the same findings is as good as the patient's
  own.

Ground truth comes from MedSynth's ``findings.jsonl``. Report ids of the release files are the image ids
of ``findings.jsonl`` (checked while loading), so every corpus report's findings are known.

Retrieval runs in-process: images and texts are embedded with the retriever (``ClipModel``) and ranked
by the cosine of the embeddings (a matrix product of unit rows). The retriever service ranks exactly so:
Qdrant's cosine distance over the same text embeddings, queried with the same image embedding (images are
decoded by the service's own ``decode_image``), one point per distinct text.

The module also holds the pieces ``training.calibrate`` reuses: loading splits with their findings, the
agreement metric, the deduplicated corpus and the top-k search.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import PIL.Image
import typer
from tqdm.auto import tqdm

from services.common.artifacts import RETRIEVERS_DIR
from training.data.medsynth.reader import MedSynthImage, read_findings
from training.data.records import DOMAINS

RECALL_KS: tuple[int, ...] = (1, 5, 10)
AGREEMENT_KS: tuple[int, ...] = (1, 5)
UNTRAINED_SEED = 0
RETRIEVER_KINDS = ("domain", "shared", "untrained")
RESULTS_JSON = "retrieval.json"
RESULTS_MARKDOWN = "retrieval.md"
CORPUS_SPLIT = "retriever_train"
# Ground truth of a MedSynth folder: findings.jsonl by image id.
GroundTruth = Mapping[str, MedSynthImage]
# Images or texts embedded per step (one progress-bar tick); the encoder batches further inside.
ENCODE_CHUNK = 256


class DualEncoder(Protocol):
    """What retrieval evaluation needs of a retriever (``services.common.clip.ClipModel`` is one)."""

    def encode_images(self, images: Sequence[PIL.Image.Image]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------------
# Metrics


def finding_agreement(a: Set[str], b: Set[str]) -> float:
    """How far two finding sets agree: their Jaccard index, where two normal studies agree fully.

    An empty set means "normal" (no finding), so normal vs normal is 1.0, normal vs anything abnormal is
    0.0, disjoint sets are 0.0, and otherwise ``|a ∩ b| / |a ∪ b|``.
    """
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def retrieval_ranks(similarity: np.ndarray, positives: Sequence[int]) -> np.ndarray:
    """1-based rank of each query's positive column; a tie with another column counts against it."""
    similarity = np.asarray(similarity, dtype=np.float64)
    positives = np.asarray(positives, dtype=np.int64)
    if similarity.ndim != 2 or len(positives) != similarity.shape[0]:
        raise ValueError(
            f"need a (queries, gallery) matrix and one positive per query, got {similarity.shape} "
            f"and {len(positives)} positives"
        )
    if len(positives) and (positives.min() < 0 or positives.max() >= similarity.shape[1]):
        raise ValueError(f"positives must be column indices in [0, {similarity.shape[1]})")
    positive_scores = similarity[np.arange(len(positives)), positives]
    return (similarity >= positive_scores[:, None]).sum(axis=1)


def recall_at_k(
    similarity: np.ndarray, positives: Sequence[int], ks: Sequence[int] = RECALL_KS
) -> dict[int, float]:
    """Share of queries whose positive ranks within the top k, for each k.

    Args:
        similarity: ``(queries, gallery)`` scores, higher is better.
        positives: for each query, the gallery column of its positive.
        ks: the cut-offs.
    """
    ranks = retrieval_ranks(similarity, positives)
    if len(ranks) == 0:
        raise ValueError("recall needs at least one query")
    return {int(k): float(np.mean(ranks <= k)) for k in ks}


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), so dot products are cosines."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def cosine_top_k(
    queries: np.ndarray, gallery: np.ndarray, k: int, *, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar gallery rows of each query: ``(indices, scores)``, both ``(queries, k)``.

    Cosine similarity, best first; equal scores keep gallery order. ``k`` is capped at the gallery size.
    Queries are processed ``chunk`` at a time, so a large corpus never needs the full score matrix.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q, g = unit_rows(queries), unit_rows(gallery)
    if q.shape[1:] != g.shape[1:]:
        raise ValueError(f"query and gallery embeddings differ in size: {q.shape[1:]} vs {g.shape[1:]}")
    k = min(k, len(g))
    indices = np.zeros((len(q), k), dtype=np.int64)
    scores = np.zeros((len(q), k), dtype=np.float32)
    for start in range(0, len(q), chunk):
        sims = q[start : start + chunk] @ g.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        indices[start : start + chunk] = order
        scores[start : start + chunk] = np.take_along_axis(sims, order, axis=1)
    return indices, scores


# --------------------------------------------------------------------------------------------------
# Data: MedSynth splits with their ground-truth findings


@dataclass(frozen=True)
class ImageText:
    """One image of a split, its retrieval text (as the corpus stores it) and its ground-truth findings."""

    id: str
    image: Path
    text: str
    findings: frozenset[str]


def read_ground_truth(data_dir: Path) -> GroundTruth:
    """Every image of a MedSynth folder (``findings.jsonl``) by id."""
    return {item.id: item for item in read_findings(data_dir, check_images=False)}


def _findings_of(
    ground_truth: GroundTruth, record_id: str, image: str, domain: str, split: str, source: Path
) -> frozenset[str]:
    """The findings of a release record, checking that its id is the image id of ``findings.jsonl``."""
    known = ground_truth.get(record_id)
    if known is None:
        raise ValueError(
            f"{source}: report id {record_id!r} is no image id of findings.jsonl; MedSynth report ids "
            "must equal image ids (is this a MedSynth folder?)"
        )
    expected = (known.domain, known.split, Path(known.image).name)
    if expected != (domain, split, Path(image).name):
        raise ValueError(
            f"{source}: report {record_id!r} ({domain}, {split}, {Path(image).name}) does not match "
            f"findings.jsonl ({', '.join(expected)})"
        )
    return known.finding_names


def normalise_text(text: str) -> str:
    """``training.index.normalise_text`` (the stored form of a report), without importing qdrant_client."""
    return text.strip()


def split_file(data_dir: Path, domain: str, split: str) -> Path:
    """The release file holding a split's image-report pairs (the retriever format's files, else reports)."""
    from training.data.medsynth.release import RETRIEVER_SPLITS

    return Path(data_dir) / domain / RETRIEVER_SPLITS.get(split, f"{split}_report.json")


def load_split(
    data_dir: Path,
    domain: str,
    split: str,
    *,
    ground_truth: GroundTruth | None = None,
) -> list[ImageText]:
    """A MedSynth split's images with their retrieval texts and findings.

    Every file is read with the domain's *retriever* release format, so the text is the kind the corpus
    holds (Harvard-FairVLMed: ``gpt4_summary``, which the report files carry too).
    """
    from training.data.formats import get_format
    from training.data.medsynth.release import RELEASE_FORMATS, dataset_name

    if domain not in RELEASE_FORMATS:
        raise ValueError(f"domain must be one of {', '.join(RELEASE_FORMATS)}, got {domain!r}")
    data_dir = Path(data_dir)
    ground_truth = read_ground_truth(data_dir) if ground_truth is None else ground_truth
    path = split_file(data_dir, domain, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a MedSynth folder (make one with `mmedrag data synth`)"
        )
    root = data_dir / domain / "images"
    records = (
        get_format(RELEASE_FORMATS[domain][0])
        .load(path, root, dataset=dataset_name(domain), domain=domain, split=split)
        .records
    )
    items = []
    for record in records:
        if record.split != split:
            raise ValueError(f"{path}: record {record.id!r} belongs to split {record.split!r}, not {split!r}")
        findings = _findings_of(ground_truth, record.id, record.image, domain, split, path)
        items.append(ImageText(record.id, root / record.image, normalise_text(record.report), findings))
    if not items:
        raise ValueError(f"{path}: the {split} split of {domain} is empty")
    return items


@dataclass(frozen=True)
class FindingCorpus:
    """A domain's retrieval corpus as the index stores it (one entry per distinct text), with findings.

    ``findings[j]`` holds the finding sets of every report whose text is ``texts[j]``.
    """

    domain: str
    texts: tuple[str, ...]
    report_ids: tuple[tuple[str, ...], ...]
    findings: tuple[tuple[frozenset[str], ...], ...]

    def __len__(self) -> int:
        return len(self.texts)

    def agreement(self, query: Set[str], index: int) -> float:
        """Agreement of a query's findings with entry ``index`` (mean over the reports sharing its text)."""
        sets = self.findings[index]
        return sum(finding_agreement(query, other) for other in sets) / len(sets)


def load_finding_corpus(
    data_dir: Path,
    domain: str,
    *,
    ground_truth: GroundTruth | None = None,
) -> FindingCorpus:
    """The domain's retrieval corpus with each report's findings.

    The same file, format and text normalisation as ``training.index.load_corpus_from_medsynth`` (what
    ``mmedrag index`` stores), grouped by text like the index (blank texts are skipped there too).
    """
    items = load_split(data_dir, domain, CORPUS_SPLIT, ground_truth=ground_truth)
    groups: dict[str, tuple[list[str], list[frozenset[str]]]] = {}
    for item in items:
        if not item.text:
            continue
        ids, sets = groups.setdefault(item.text, ([], []))
        ids.append(item.id)
        sets.append(item.findings)
    if not groups:
        raise ValueError(f"{split_file(data_dir, domain, CORPUS_SPLIT)}: the corpus of {domain} has no text")
    return FindingCorpus(
        domain=domain,
        texts=tuple(groups),
        report_ids=tuple(tuple(ids) for ids, _ in groups.values()),
        findings=tuple(tuple(sets) for _, sets in groups.values()),
    )


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, ENCODE_CHUNK):
        yield slice(start, min(start + ENCODE_CHUNK, n))


def encode_images(
    encoder: DualEncoder, paths: Sequence[Path], *, progress: bool = False, desc: str = "images"
) -> np.ndarray:
    """Embed image files, decoded exactly as the services decode uploads (``decode_image``)."""
    from services.common.images import decode_image

    parts = []
    for part in tqdm(list(_chunks(len(paths))), desc=desc, unit="chunk", disable=not progress):
        images = [decode_image(Path(path).read_bytes()).image for path in paths[part]]
        parts.append(np.asarray(encoder.encode_images(images), dtype=np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def encode_texts(
    encoder: DualEncoder, texts: Sequence[str], *, progress: bool = False, desc: str = "texts"
) -> np.ndarray:
    """Embed texts in chunks (a progress bar for large corpora)."""
    parts = [
        np.asarray(encoder.encode_texts(list(texts[part])), dtype=np.float32)
        for part in tqdm(list(_chunks(len(texts))), desc=desc, unit="chunk", disable=not progress)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def context_agreements(
    queries: Sequence[ImageText], corpus: FindingCorpus, indices: np.ndarray
) -> np.ndarray:
    """``(queries, k)`` agreement of each retrieved corpus entry with its query's findings."""
    return np.array(
        [
            [corpus.agreement(query.findings, int(j)) for j in row]
            for query, row in zip(queries, indices, strict=True)
        ],
        dtype=np.float64,
    ).reshape(len(queries), indices.shape[1] if indices.ndim == 2 else 0)


# --------------------------------------------------------------------------------------------------
# One retriever on one domain


@dataclass(frozen=True)
class RetrievalMetrics:
    """One retriever's numbers on one domain."""

    queries: int  # test images
    gallery: int  # distinct test report texts (Recall@k)
    corpus: int  # distinct corpus texts (agreement)
    recall: dict[int, float]
    agreement: dict[int, float]


def evaluate_retriever(
    encoder: DualEncoder,
    data_dir: Path,
    domain: str,
    *,
    split: str = "test",
    recall_ks: Sequence[int] = RECALL_KS,
    agreement_ks: Sequence[int] = AGREEMENT_KS,
    ground_truth: GroundTruth | None = None,
    progress: bool = False,
) -> RetrievalMetrics:
    """Recall@k over the split's own reports and finding agreement of the top-k corpus reports."""
    data_dir = Path(data_dir)
    ground_truth = read_ground_truth(data_dir) if ground_truth is None else ground_truth
    queries = load_split(data_dir, domain, split, ground_truth=ground_truth)
    corpus = load_finding_corpus(data_dir, domain, ground_truth=ground_truth)
    image_vectors = encode_images(
        encoder, [q.image for q in queries], progress=progress, desc=f"{domain} images"
    )

    gallery = list(dict.fromkeys(q.text for q in queries))
    position = {text: i for i, text in enumerate(gallery)}
    gallery_vectors = encode_texts(encoder, gallery, progress=progress, desc=f"{domain} gallery")
    similarity = unit_rows(image_vectors) @ unit_rows(gallery_vectors).T
    recall = recall_at_k(similarity, [position[q.text] for q in queries], recall_ks)

    corpus_vectors = encode_texts(encoder, corpus.texts, progress=progress, desc=f"{domain} corpus")
    indices, _ = cosine_top_k(image_vectors, corpus_vectors, max(agreement_ks))
    agreements = context_agreements(queries, corpus, indices)
    agreement = {int(k): float(agreements[:, :k].mean(axis=1).mean()) for k in agreement_ks}
    return RetrievalMetrics(
        queries=len(queries), gallery=len(gallery), corpus=len(corpus), recall=recall, agreement=agreement
    )


# --------------------------------------------------------------------------------------------------
# The untrained baseline


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt")


def untrained_retriever(like: Path, *, seed: int = UNTRAINED_SEED, workdir: Path) -> Any:
    """A ``ClipModel`` of random weights with the architecture and preprocessing of the retriever in ``like``.

    Built by ``training.artifacts.clip.create_clip_model`` (same seed, same weights) and written to
    ``workdir`` so it loads through the same path as trained retrievers.
    """
    from services.common.artifacts import read_json
    from services.common.clip import OPEN_CLIP_CONFIG, ClipModel
    from training.artifacts.clip import create_clip_model, save_clip_model

    like = Path(like)
    config = read_json(like / OPEN_CLIP_CONFIG, like.parent, "open_clip config")
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{like / OPEN_CLIP_CONFIG}: no 'model_cfg'")
    text_cfg = model_cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):  # local towers named relative to the folder
        name = text_cfg.get(key)
        if name and not Path(name).is_absolute() and (like / name).exists():
            text_cfg[key] = str((like / name).resolve())
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "model_cfg.json"
    config_path.write_text(json.dumps(model_cfg), encoding="utf-8")
    folder = workdir / "untrained"
    model = create_clip_model(str(config_path), seed=seed)
    save_clip_model(folder, model, model_cfg, preprocess_cfg=config.get("preprocess_cfg"))
    for name in _TOKENIZER_FILES:  # open_clip's convention: tokenizer files next to the weights
        if (like / name).is_file():
            shutil.copyfile(like / name, folder / name)
    return ClipModel.load(folder, root=workdir)


# --------------------------------------------------------------------------------------------------
# The comparison table


@dataclass
class RetrievalRow:
    """One line of the table: a retriever kind on a domain, or why it was skipped."""

    domain: str
    retriever: str  # one of RETRIEVER_KINDS
    folder: str | None = None  # the retriever's folder (untrained: the one whose architecture it copies)
    weights_sha256: str | None = None
    metrics: RetrievalMetrics | None = None
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "domain": self.domain,
            "retriever": self.retriever,
            "folder": self.folder,
            "weights_sha256": self.weights_sha256,
            "skipped": self.skipped,
        }
        if self.metrics is not None:
            metrics = asdict(self.metrics)
            row.update({key: metrics[key] for key in ("queries", "gallery", "corpus")})
            row.update({f"recall@{k}": v for k, v in self.metrics.recall.items()})
            row.update({f"agreement@{k}": v for k, v in self.metrics.agreement.items()})
        return row


@dataclass
class RetrievalReport:
    """Every row, with what was evaluated."""

    data: str
    split: str
    seed: int
    rows: list[RetrievalRow] = field(default_factory=list)
    recall_ks: tuple[int, ...] = RECALL_KS
    agreement_ks: tuple[int, ...] = AGREEMENT_KS

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "split": self.split,
            "corpus_split": CORPUS_SPLIT,
            "untrained_seed": self.seed,
            "recall_ks": list(self.recall_ks),
            "agreement_ks": list(self.agreement_ks),
            "agreement": "Jaccard of finding sets (two normal studies agree fully), mean over top-k, queries",
            "rows": [row.to_json() for row in self.rows],
        }

    def notes(self) -> list[str]:
        notes = [
            f"{row.domain} / {row.retriever}: skipped ({row.skipped})" for row in self.rows if row.skipped
        ]
        small = sorted(
            {
                row.domain
                for row in self.rows
                if row.metrics is not None and row.metrics.gallery <= max(self.recall_ks)
            }
        )
        if small:
            notes.append(
                f"gallery of {', '.join(small)} has at most {max(self.recall_ks)} texts: "
                "Recall@k is 1 for k >= gallery size"
            )
        return notes

    def markdown(self) -> str:
        """The table (one row per domain and retriever kind), then the notes."""
        header = (
            ["domain", "retriever"]
            + [f"R@{k}" for k in self.recall_ks]
            + [f"agree@{k}" for k in self.agreement_ks]
            + ["queries", "gallery", "corpus"]
        )
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for row in self.rows:
            if row.metrics is None:
                cells = [row.domain, row.retriever] + ["–"] * (len(header) - 2)
            else:
                m = row.metrics
                cells = (
                    [row.domain, row.retriever]
                    + [f"{100 * m.recall[k]:.1f}" for k in self.recall_ks]
                    + [f"{m.agreement[k]:.3f}" for k in self.agreement_ks]
                    + [str(m.queries), str(m.gallery), str(m.corpus)]
                )
            lines.append("| " + " | ".join(cells) + " |")
        text = "\n".join(lines) + "\n"
        text += (
            f"\nRecall@k in %, image → text over the {self.split} split's distinct reports; agree@k: mean "
            f"finding agreement (Jaccard) of the top-k reports retrieved from the {CORPUS_SPLIT} corpus.\n"
        )
        for note in self.notes():
            text += f"\n- {note}"
        return text.rstrip("\n") + "\n"


def _sha(encoder: Any) -> str | None:
    sha = getattr(encoder, "weights_sha256", None)
    return sha[:12] if isinstance(sha, str) else None


def evaluate_retrieval(
    data_dir: Path,
    artifacts: Path,
    *,
    domains: Sequence[str] | None = None,
    shared: Path | None = None,
    seed: int = UNTRAINED_SEED,
    split: str = "test",
    progress: bool = False,
) -> RetrievalReport:
    """Evaluate the domain, shared and untrained retrievers on each domain (see the module docstring).

    Args:
        data_dir: a MedSynth folder.
        artifacts: the artifacts folder holding ``retrievers/<domain>``.
        domains: domains to evaluate; default: every domain with data in ``data_dir``.
        shared: folder of one retriever trained on all domains mixed (None: those rows are skipped).
        seed: seed of the untrained retriever's random weights.
        split: the split whose images are the queries.
        progress: show progress bars.
    """
    from services.common.clip import ClipModel

    data_dir, artifacts = Path(data_dir), Path(artifacts)
    if domains is None:
        domains = [d for d in DOMAINS if split_file(data_dir, d, CORPUS_SPLIT).is_file()]
        if not domains:
            raise FileNotFoundError(
                f"{data_dir}: no domain has a retrieval corpus (is it a MedSynth folder?)"
            )
    for domain in domains:
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    ground_truth = read_ground_truth(data_dir)
    report = RetrievalReport(data=str(data_dir), split=split, seed=seed)
    shared_model = ClipModel.load(Path(shared), root=Path(shared).parent) if shared is not None else None

    def run(domain: str, kind: str, encoder: Any, folder: Path) -> None:
        metrics = evaluate_retriever(
            encoder, data_dir, domain, split=split, ground_truth=ground_truth, progress=progress
        )
        report.rows.append(RetrievalRow(domain, kind, str(folder), _sha(encoder), metrics))

    with tempfile.TemporaryDirectory(prefix="mmedrag-untrained-") as tmp:
        for domain in domains:
            folder = artifacts / RETRIEVERS_DIR / domain
            has_domain = (folder / "open_clip_config.json").is_file()
            if has_domain:
                run(domain, "domain", ClipModel.load(folder, root=artifacts), folder)
            else:
                report.rows.append(
                    RetrievalRow(domain, "domain", str(folder), skipped=f"no retriever in {folder}")
                )
            if shared_model is not None and shared is not None:
                run(domain, "shared", shared_model, Path(shared))
            else:
                report.rows.append(RetrievalRow(domain, "shared", skipped="no --shared retriever given"))
            like = folder if has_domain else Path(shared) if shared is not None else None
            if like is None:
                report.rows.append(
                    RetrievalRow(domain, "untrained", skipped="no retriever whose architecture to copy")
                )
                continue
            untrained = untrained_retriever(like, seed=seed, workdir=Path(tmp) / domain)
            run(domain, "untrained", untrained, like)
    return report


def write_report(report: RetrievalReport, out: Path) -> tuple[Path, Path]:
    """Write ``retrieval.json`` and ``retrieval.md`` into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out / RESULTS_JSON, out / RESULTS_MARKDOWN
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    markdown_path.write_text(report.markdown(), encoding="utf-8")
    return json_path, markdown_path


def eval_retrieval_cli(
    data: Annotated[Path, typer.Option("--data", help="MedSynth folder (queries: its test split).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for retrieval.json and retrieval.md.")],
    artifacts: Annotated[
        Path,
        typer.Option(
            "--artifacts", envvar="MMEDRAG_ARTIFACTS", help="Artifacts folder (its retrievers/<domain>)."
        ),
    ] = Path("artifacts"),
    domains: Annotated[
        list[str] | None,
        typer.Option("--domain", help="Domain to evaluate (repeatable); default: all in --data."),
    ] = None,
    shared: Annotated[
        Path | None,
        typer.Option(
            "--shared", help="A retriever trained on all domains mixed; its rows are skipped if absent."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the untrained retriever's weights.")
    ] = UNTRAINED_SEED,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch threads (default: torch's).")
    ] = None,
) -> None:
    """Recall@1/5/10 and finding agreement of domain, shared and untrained retrievers on MedSynth test."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    report = evaluate_retrieval(data, artifacts, domains=domains, shared=shared, seed=seed, progress=True)
    json_path, markdown_path = write_report(report, out)
    typer.echo(report.markdown())
    typer.echo(f"wrote {json_path} and {markdown_path}")
