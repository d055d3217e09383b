"""Contact sheets: one PNG per domain, grid arithmetic, labels drawn under the thumbnails."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.medsynth.catalogue import load_catalogue
from training.data.medsynth.reader import FindingMention, MedSynthImage
from training.data.preview import GAP, finding_labels, wrap_text, write_contact_sheets

THUMB = 64


def _sheet(data_dir: Path, out: Path, **kwargs) -> Image.Image:
    paths = write_contact_sheets(data_dir, out, thumb=THUMB, **kwargs)
    return Image.open(next(p for p in paths if p.name == "preview_radiology.png")).convert("RGB")


def test_one_file_per_domain(fake_medsynth_dir: Path, tmp_path: Path) -> None:
    paths = write_contact_sheets(fake_medsynth_dir, tmp_path, per_domain=4, thumb=THUMB)
    assert [p.name for p in paths] == [
        "preview_radiology.png",
        "preview_ophthalmology.png",
        "preview_pathology.png",
    ]
    assert all(p.is_file() and p.parent == tmp_path for p in paths)


def test_default_out_dir_is_data_dir_and_only_domains_with_images(make_fake_medsynth) -> None:
    data_dir = make_fake_medsynth(per_domain=8, domains=("pathology",))
    paths = write_contact_sheets(data_dir, per_domain=4, thumb=THUMB)
    assert paths == [data_dir / "preview_pathology.png"]


def test_grid_arithmetic_and_text_under_thumbnails(fake_medsynth_dir: Path, tmp_path: Path) -> None:
    cols = 3
    sheets = {
        rows: _sheet(fake_medsynth_dir, tmp_path / str(rows), per_domain=cols * rows, columns=cols)
        for rows in (1, 2, 3)
    }
    width = cols * (THUMB + GAP) + GAP
    assert {im.width for im in sheets.values()} == {width}
    row_h = sheets[2].height - sheets[1].height
    assert row_h == sheets[3].height - sheets[2].height
    assert row_h > THUMB + 2 * 12  # room for at least two lines of text per cell

    im = np.asarray(sheets[3]).astype(int)
    first_row_top = sheets[1].height - row_h  # title band + gap
    for r in range(3):
        for c in range(cols):
            x0, y0 = GAP + c * (THUMB + GAP), first_row_top + r * row_h
            thumb = im[y0 : y0 + THUMB, x0 : x0 + THUMB]
            band = im[y0 + THUMB : y0 + row_h - GAP, x0 : x0 + THUMB]
            assert (thumb.min(axis=2) < 200).mean() > 0.5  # the (noisy, dark) image is there
            dark = (band.max(axis=2) < 160).sum()
            assert dark > 30, f"no text under cell {r},{c}"
            gap = im[y0 : y0 + row_h - GAP, x0 + THUMB : x0 + THUMB + GAP]
            assert (gap == 255).all()  # white gutter between cells
    # Title band has text too.
    assert (im[:first_row_top].max(axis=2) < 160).sum() > 50


def test_respects_per_domain(fake_medsynth_dir: Path, tmp_path: Path) -> None:
    four = _sheet(fake_medsynth_dir, tmp_path / "a", per_domain=4, columns=6)
    assert four.width == 4 * (THUMB + GAP) + GAP  # fewer images than columns: narrower grid
    one_row = _sheet(fake_medsynth_dir, tmp_path / "b", per_domain=6, columns=6)
    assert four.height == one_row.height
    seven = _sheet(fake_medsynth_dir, tmp_path / "c", per_domain=7, columns=6)
    assert seven.height > one_row.height
    # Asking for more than there is shows everything (120 images, 12 rows of 10).
    everything = _sheet(fake_medsynth_dir, tmp_path / "d", per_domain=500, columns=10)
    ten = _sheet(fake_medsynth_dir, tmp_path / "e", per_domain=10, columns=10)
    twenty = _sheet(fake_medsynth_dir, tmp_path / "f", per_domain=20, columns=10)
    assert everything.height == ten.height + 11 * (twenty.height - ten.height)


def test_labels_from_catalogue() -> None:
    catalogue = load_catalogue()

    def item(*findings: FindingMention) -> MedSynthImage:
        return MedSynthImage("r-1", "radiology", "test", "x.png", Path("x.png"), tuple(findings))

    assert finding_labels(item(), catalogue) == ["normal"]
    labels = finding_labels(
        item(FindingMention("nodule", "mild", True), FindingMention("cardiomegaly", "severe", False)),
        catalogue,
    )
    assert labels == ["pulmonary nodule (subtle)", "cardiomegaly"]


def test_wrap_text_fits_width() -> None:
    from PIL import ImageFont

    font = ImageFont.load_default(size=12)
    lines = wrap_text(font, "right upper zone consolidation (subtle) supercalifragilisticexpialidocious", 80)
    assert len(lines) > 2
    assert all(font.getlength(line) <= 80 for line in lines)
    assert (
        " ".join(lines).replace(" ", "")
        == "rightupperzoneconsolidation(subtle)supercalifragilisticexpialidocious"
    )


def test_missing_image_names_the_file(make_fake_medsynth) -> None:
    data_dir = make_fake_medsynth(per_domain=6)
    (data_dir / "images" / "radiology" / "radiology-0003.png").unlink()
    with pytest.raises(ValueError, match=re.escape("radiology-0003.png")):
        write_contact_sheets(data_dir)
