"""Contact sheets of a MedSynth folder: look at the images next to the findings they are meant to show.

One PNG per domain (``preview_<domain>.png``): a title band, then a grid of thumbnails, each with its
id and its findings (human labels from the catalogue, " (subtle)" for subtle ones, "normal" when it has
none) word-wrapped underneath.

Layout (all sizes in pixels): ``cols = min(columns, n)``, ``rows = ceil(n / cols)``;
``width = cols * (thumb + GAP) + GAP``; ``height = title_height + rows * (thumb + label_height + GAP) + GAP``
where ``label_height = label_lines * line_height`` is the same for every cell of a sheet.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from training.data.errors import DatasetFormatError
from training.data.medsynth.catalogue import load_catalogue
from training.data.medsynth.reader import MedSynthImage, id_sort_key, read_findings, read_meta

GAP = 8
BACKGROUND = (255, 255, 255)
TEXT = (25, 25, 25)
MUTED = (105, 105, 105)
NORMAL = (0, 95, 30)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _line_height(font: Font) -> int:
    _, top, _, bottom = font.getbbox("Ag|(jy")
    return int(bottom - min(top, 0)) + 3


def _width(font: Font, text: str) -> float:
    return font.getlength(text)


def _fit(font: Font, text: str, width: int) -> str:
    """``text`` shortened with an ellipsis so that it fits ``width``."""
    if _width(font, text) <= width:
        return text
    while text and _width(font, text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def wrap_text(font: Font, text: str, width: int) -> list[str]:
    """Greedy word wrap by rendered width; words wider than ``width`` are broken by characters."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _width(font, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while _width(font, word) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and _width(font, word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines or [""]


def finding_labels(item: MedSynthImage, catalogue: dict[str, Any]) -> list[str]:
    """Short human labels of the image's findings (catalogue order of appearance), or ``["normal"]``."""
    specs = catalogue.get(item.domain, {}).get("findings", {})
    labels: list[str] = []
    for name in dict.fromkeys(f.name for f in item.findings):
        label = specs.get(name, {}).get("label", name.replace("_", " "))
        labels.append(label + (" (subtle)" if item.is_subtle(name) else ""))
    return labels or ["normal"]


def _cell_lines(
    item: MedSynthImage, catalogue: dict[str, Any], font: Font, width: int, max_lines: int
) -> list[tuple[str, int, tuple[int, int, int]]]:
    """(text, x indent, colour) per line: the id, then each finding; wrapped parts are indented."""
    indent = round(font.getlength("mm") * 0.6)
    lines: list[tuple[str, int, tuple[int, int, int]]] = [(_fit(font, item.id, width), 0, MUTED)]
    labels = finding_labels(item, catalogue)
    color = NORMAL if labels == ["normal"] else TEXT
    for label in labels:
        first, *rest = wrap_text(font, label, width)
        lines.append((first, 0, color))
        for part in wrap_text(font, " ".join(rest), width - indent) if rest else []:
            lines.append((part, indent, color))
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        text, x, color = lines[-1]
        lines[-1] = (_fit(font, text + " …", width - x), x, color)
    return lines


def _thumbnail(item: MedSynthImage, findings_path: Path, thumb: int) -> Image.Image:
    try:
        with Image.open(item.path) as img:
            return ImageOps.contain(img.convert("RGB"), (thumb, thumb), Image.Resampling.LANCZOS)
    except OSError as exc:
        raise DatasetFormatError(
            findings_path, item.id, "image", f"cannot read image {item.path}: {exc}"
        ) from exc


def write_contact_sheets(
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    per_domain: int = 24,
    columns: int = 6,
    thumb: int = 160,
    label_lines: int = 6,
) -> list[Path]:
    """Write ``preview_<domain>.png`` for every domain that has images; returns the paths written.

    Each sheet shows the first ``per_domain`` images of the domain sorted by id, ``columns`` per row, as
    ``thumb`` x ``thumb`` thumbnails with ``label_lines`` lines of text underneath (the id, then the
    findings, continuation lines indented; an overlong list ends with "…"). ``out_dir`` defaults to
    ``data_dir``.
    """
    if per_domain < 1 or columns < 1 or label_lines < 1:
        raise ValueError("per_domain, columns and label_lines must be >= 1")
    if thumb < 32:
        raise ValueError(f"thumb must be >= 32 pixels, got {thumb}")
    data_dir = Path(data_dir)
    out = Path(out_dir) if out_dir is not None else data_dir
    catalogue = load_catalogue()
    items = read_findings(data_dir, catalogue=catalogue)
    meta = read_meta(data_dir)
    findings_path = data_dir / "findings.jsonl"

    body = _font(max(10, round(thumb / 12)))
    title_font = _font(max(14, round(thumb / 8)))
    line_h = _line_height(body)
    title_h = GAP + _line_height(title_font) + line_h + GAP
    label_h = label_lines * line_h

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for domain in catalogue:
        dom_items = sorted((it for it in items if it.domain == domain), key=lambda it: id_sort_key(it.id))
        shown = dom_items[:per_domain]
        if not shown:
            continue
        cols = min(columns, len(shown))
        rows = math.ceil(len(shown) / cols)
        width = cols * (thumb + GAP) + GAP
        height = title_h + rows * (thumb + label_h + GAP) + GAP
        sheet = Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(sheet)

        title = f"{domain} · MedSynth seed {meta.get('seed', '?')}, difficulty {meta.get('difficulty', '?')}"
        subtitle = f"first {len(shown)} of {len(dom_items)} images, sorted by id"
        draw.text((GAP, GAP), _fit(title_font, title, width - 2 * GAP), fill=TEXT, font=title_font)
        draw.text(
            (GAP, GAP + _line_height(title_font)),
            _fit(body, subtitle, width - 2 * GAP),
            fill=MUTED,
            font=body,
        )

        for index, item in enumerate(shown):
            r, c = divmod(index, cols)
            x = GAP + c * (thumb + GAP)
            y = title_h + GAP + r * (thumb + label_h + GAP)
            image = _thumbnail(item, findings_path, thumb)
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
            for k, (line, dx, color) in enumerate(_cell_lines(item, catalogue, body, thumb, label_lines)):
                draw.text((x + dx, y + thumb + 2 + k * line_h), line, fill=color, font=body)

        path = out / f"preview_{domain}.png"
        sheet.save(path)
        written.append(path)
    return written
