"""Behaviour of the MedSynth image drawer: API contract, determinism, and that every finding shows up
in the right place. Findings are checked by drawing the same seed with and without them; the drawer
keeps everything else identical, so the difference image is the finding."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.medsynth.draw import (
    DrawStyle,
    FindingInstance,
    draw_image,
    finding_names,
    load_catalogue,
)

DOMAINS = ("radiology", "ophthalmology", "pathology")
STYLE = DrawStyle()


def pixels(domain: str, findings: list[FindingInstance], seed: int, style: DrawStyle = STYLE) -> np.ndarray:
    image, _ = draw_image(domain, findings, np.random.default_rng(seed), style)
    return np.asarray(image).astype(np.float32)


def luminance(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image.mean(axis=2)


def change(domain: str, name: str, seed: int, severity: str = "severe", contrast: float = 1.0) -> np.ndarray:
    """Signed luminance change a finding makes, compared with the same seed drawn without it."""
    with_finding = pixels(domain, [FindingInstance(name, severity, contrast)], seed)
    return luminance(with_finding) - luminance(pixels(domain, [], seed))


def centroid(weights: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of mass in 0..1 image units."""
    size = weights.shape[0]
    ys, xs = np.mgrid[0:size, 0:size]
    total = weights.sum()
    assert total > 0
    return float((xs * weights).sum() / total / size), float((ys * weights).sum() / total / size)


# ---------------------------------------------------------------------------------------------------
# Contract


@pytest.mark.parametrize("domain", DOMAINS)
def test_same_seed_gives_identical_bytes_and_different_seeds_differ(domain: str) -> None:
    names = finding_names(domain)
    findings = [FindingInstance(names[0], "moderate", 1.0), FindingInstance(names[-1], "mild", 0.5)]
    first, m1 = draw_image(domain, findings, np.random.default_rng(42), STYLE)
    second, m2 = draw_image(domain, findings, np.random.default_rng(42), STYLE)
    other, _ = draw_image(domain, findings, np.random.default_rng(43), STYLE)
    assert first.tobytes() == second.tobytes()
    assert m1 == m2
    assert first.tobytes() != other.tobytes()


@pytest.mark.parametrize("domain", DOMAINS)
def test_normal_images_vary_between_seeds(domain: str) -> None:
    images = [luminance(pixels(domain, [], seed)) for seed in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(images[a] - images[b]).mean() > 2.0


@pytest.mark.parametrize("domain", DOMAINS)
def test_finding_order_in_the_list_does_not_matter(domain: str) -> None:
    names = finding_names(domain)
    findings = [FindingInstance(name, "moderate", 0.8) for name in names[:3]]
    forward = pixels(domain, findings, 5)
    backward = pixels(domain, list(reversed(findings)), 5)
    assert np.array_equal(forward, backward)


@pytest.mark.parametrize(
    ("domain", "mode"), [("radiology", "L"), ("ophthalmology", "RGB"), ("pathology", "RGB")]
)
@pytest.mark.parametrize("size", [64, 224, 512])
def test_mode_and_size(domain: str, mode: str, size: int) -> None:
    findings = [FindingInstance(name, "severe", 1.0) for name in finding_names(domain)]
    image, _ = draw_image(domain, findings, np.random.default_rng(0), DrawStyle(size=size))
    assert image.mode == mode
    assert image.size == (size, size)


def test_every_catalogue_finding_is_drawable() -> None:
    catalogue = load_catalogue()
    for domain in DOMAINS:
        for name in catalogue[domain]["findings"]:
            for severity in ("mild", "moderate", "severe"):
                draw_image(domain, [FindingInstance(name, severity, 0.5)], np.random.default_rng(1), STYLE)


def test_unknown_names_and_bad_values_raise() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not_a_finding"):
        draw_image("radiology", [FindingInstance("not_a_finding", "mild", 1.0)], rng, STYLE)
    with pytest.raises(ValueError, match="glaucoma"):  # a finding of another domain
        draw_image("pathology", [FindingInstance("glaucoma", "mild", 1.0)], rng, STYLE)
    with pytest.raises(ValueError, match="dermatology"):
        draw_image("dermatology", [], rng, STYLE)
    with pytest.raises(ValueError, match="nodule"):
        draw_image("radiology", [FindingInstance("nodule", "mild", 0.0)], rng, STYLE)
    with pytest.raises(ValueError, match="nodule"):
        draw_image("radiology", [FindingInstance("nodule", "huge", 1.0)], rng, STYLE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        draw_image("radiology", [], rng, DrawStyle(size=32))


def test_noise_setting_controls_pixel_noise() -> None:
    quiet = pixels("pathology", [], 3, DrawStyle(noise=0.0))
    noisy = pixels("pathology", [], 3, DrawStyle(noise=0.08))
    assert 0.05 * 255 < (noisy - quiet).std() < 0.1 * 255


# ---------------------------------------------------------------------------------------------------
# Measurements


def test_cardiothoracic_ratio_normal_and_enlarged() -> None:
    for seed in range(8):
        _, normal = draw_image("radiology", [], np.random.default_rng(seed), STYLE)
        ratio = normal["cardiothoracic_ratio"]
        assert isinstance(ratio, float) and round(ratio, 2) == ratio
        assert 0.40 <= ratio <= 0.48
        assert "nodule_side" not in normal
        ratios = []
        for severity in ("mild", "moderate", "severe"):
            finding = [FindingInstance("cardiomegaly", severity, 1.0)]
            _, enlarged = draw_image("radiology", finding, np.random.default_rng(seed), STYLE)
            ratios.append(enlarged["cardiothoracic_ratio"])
        assert all(0.55 <= r <= 0.68 for r in ratios)
        assert ratios == sorted(ratios)


def test_cup_to_disc_ratio_normal_and_glaucoma() -> None:
    for seed in range(8):
        _, normal = draw_image("ophthalmology", [], np.random.default_rng(seed), STYLE)
        assert normal["cup_to_disc_ratio"] in (0.2, 0.3, 0.4)
        assert normal["eye"] in ("right", "left")
        ratios = []
        for severity in ("mild", "moderate", "severe"):
            finding = [FindingInstance("glaucoma", severity, 1.0)]
            _, cupped = draw_image("ophthalmology", finding, np.random.default_rng(seed), STYLE)
            ratios.append(cupped["cup_to_disc_ratio"])
        assert all(0.6 <= r <= 0.9 and round(r, 1) == r for r in ratios)
        assert ratios == sorted(ratios)


def test_pathology_measurements_are_a_dict() -> None:
    _, measurements = draw_image("pathology", [], np.random.default_rng(0), STYLE)
    assert isinstance(measurements, dict)


# ---------------------------------------------------------------------------------------------------
# Radiology findings: the patient's right is the image left.


def _lower_lung_brightening(diff: np.ndarray) -> tuple[float, float]:
    """Mean brightening in the lower lung zones of the image-left and image-right halves."""
    size = diff.shape[0]
    rows = slice(int(0.55 * size), int(0.8 * size))
    left = diff[rows, int(0.15 * size) : int(0.45 * size)].mean()
    right = diff[rows, int(0.55 * size) : int(0.85 * size)].mean()
    return float(left), float(right)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_effusion_brightens_the_base_of_its_own_side(seed: int) -> None:
    left_img, right_img = _lower_lung_brightening(change("radiology", "pleural_effusion_left", seed))
    assert right_img > 10 and right_img > 5 * max(left_img, 0.1)
    left_img, right_img = _lower_lung_brightening(change("radiology", "pleural_effusion_right", seed))
    assert left_img > 10 and left_img > 5 * max(right_img, 0.1)


def test_effusion_height_grows_with_severity() -> None:
    areas = [
        (change("radiology", "pleural_effusion_right", 4, s) > 8).sum()
        for s in ("mild", "moderate", "severe")
    ]
    assert areas[0] < areas[1] < areas[2]


@pytest.mark.parametrize("side", ["right", "left"])
def test_consolidation_is_in_its_zone(side: str) -> None:
    for seed in range(3):
        upper = np.clip(change("radiology", f"consolidation_{side}_upper", seed), 0, None)
        lower = np.clip(change("radiology", f"consolidation_{side}_lower", seed), 0, None)
        (ux, uy), (lx, ly) = centroid(upper), centroid(lower)
        if side == "right":
            assert ux < 0.5 and lx < 0.5
        else:
            assert ux > 0.5 and lx > 0.5
        assert uy + 0.1 < ly


def test_cardiomegaly_widens_the_heart_to_the_image_right() -> None:
    diff = change("radiology", "cardiomegaly", 6)
    assert diff.min() > -12  # only adds opacity
    x, y = centroid(np.clip(diff, 0, None))
    assert x > 0.5 and y > 0.45


def test_nodule_is_a_small_bright_spot_on_the_reported_side() -> None:
    for seed in range(6):
        finding = [FindingInstance("nodule", "moderate", 1.0)]
        image, measurements = draw_image("radiology", finding, np.random.default_rng(seed), STYLE)
        diff = np.asarray(image).astype(np.float32) - pixels("radiology", [], seed)
        spot = diff > 20
        assert 0.001 < spot.mean() < 0.02
        x, _ = centroid(spot.astype(np.float32))
        assert measurements["nodule_side"] == ("right" if x < 0.5 else "left")


@pytest.mark.parametrize(("name", "image_left"), [("pneumothorax_right", True), ("pneumothorax_left", False)])
def test_pneumothorax_darkens_the_apex_and_draws_a_pleural_line(name: str, image_left: bool) -> None:
    diff = change("radiology", name, 7)
    darker = np.clip(-diff, 0, None)
    x, y = centroid(darker * (darker > 8))
    assert (x < 0.5) == image_left
    assert y < 0.5
    assert (diff > 15).sum() > 20  # the bright visceral pleural line


def test_lower_contrast_means_a_smaller_change() -> None:
    strong = np.abs(change("radiology", "pleural_effusion_left", 3, "moderate", 1.0)).sum()
    subtle = np.abs(change("radiology", "pleural_effusion_left", 3, "moderate", 0.5)).sum()
    scaled = pixels(
        "radiology",
        [FindingInstance("pleural_effusion_left", "moderate", 1.0)],
        3,
        DrawStyle(contrast_scale=0.5),
    )
    assert 0.35 * strong < subtle < 0.65 * strong
    assert np.abs(luminance(scaled) - pixels("radiology", [], 3)).sum() == pytest.approx(subtle, rel=0.05)


# ---------------------------------------------------------------------------------------------------
# Ophthalmology findings


def _whitish(image: np.ndarray) -> int:
    """Pixels as pale as the optic cup (blue channel high: the retina and disc rim are orange)."""
    return int((image[..., 2] > 150).sum())


def test_glaucoma_enlarges_the_pale_cup() -> None:
    for seed in range(4):
        normal = _whitish(pixels("ophthalmology", [], seed))
        cupped = _whitish(pixels("ophthalmology", [FindingInstance("glaucoma", "severe", 1.0)], seed))
        assert cupped > 2.5 * max(normal, 1)


def test_haemorrhages_add_dark_red_spots_that_grow_in_number() -> None:
    seed = 2
    normal = pixels("ophthalmology", [], seed)
    counts = []
    for severity in ("mild", "severe"):
        image = pixels("ophthalmology", [FindingInstance("haemorrhage", severity, 1.0)], seed)
        darker = (normal[..., 0] - image[..., 0]) > 25
        assert (image[..., 0][darker] > image[..., 2][darker]).all()  # still red, not black
        counts.append(darker.sum())
    assert 20 < counts[0] < counts[1]


def test_drusen_add_yellow_dots_near_the_macula() -> None:
    for seed in range(4):
        finding = [FindingInstance("drusen", "moderate", 1.0)]
        image, measurements = draw_image("ophthalmology", finding, np.random.default_rng(seed), STYLE)
        image = np.asarray(image).astype(np.float32)
        normal = pixels("ophthalmology", [], seed)
        brighter = (image[..., 1] - normal[..., 1]) > 30
        assert brighter.sum() > 10
        assert (image[..., 0][brighter] > image[..., 2][brighter] + 60).all()  # yellow: R, G >> B
        x, _ = centroid(brighter.astype(np.float32))
        # The macula is temporal: image left in a right eye (disc on the right), image right in a left eye.
        assert (x < 0.5) == (measurements["eye"] == "right")


def test_tortuous_vessels_change_vessel_course_more_when_severe() -> None:
    seed = 8
    mild = np.abs(change("ophthalmology", "tortuous_vessels", seed, "mild")) > 20
    severe = np.abs(change("ophthalmology", "tortuous_vessels", seed, "severe")) > 20
    assert 0 < mild.mean() < severe.mean() < 0.2


# ---------------------------------------------------------------------------------------------------
# Pathology findings


def test_tumour_darkens_a_region_that_grows_with_severity() -> None:
    areas = []
    for severity in ("mild", "moderate", "severe"):
        diff = change("pathology", "tumour", 4, severity)
        assert diff.mean() < 0
        areas.append((diff < -30).mean())
    assert areas[0] < areas[1] < areas[2]


def test_inflammation_adds_clusters_of_dark_nuclei() -> None:
    seed = 5
    normal = pixels("pathology", [], seed)
    image = pixels("pathology", [FindingInstance("inflammation", "moderate", 1.0)], seed)
    very_dark = lambda img: (luminance(img) < 60).sum()  # noqa: E731
    assert very_dark(image) > very_dark(normal) + 150


def test_necrosis_is_a_paler_region_without_intact_nuclei() -> None:
    seed = 6
    normal = pixels("pathology", [], seed)
    image = pixels("pathology", [FindingInstance("necrosis", "severe", 1.0)], seed)
    diff = luminance(image) - luminance(normal)
    region = np.abs(diff) > 3
    assert region.mean() > 0.2
    assert luminance(image)[region].mean() > luminance(normal)[region].mean() + 10


def test_mitoses_add_very_dark_figures_in_clear_halos() -> None:
    seed = 7
    normal = pixels("pathology", [], seed)
    counts = []
    for severity in ("mild", "severe"):
        image = pixels("pathology", [FindingInstance("mitoses", severity, 1.0)], seed)
        diff = luminance(image) - luminance(normal)
        assert (diff > 20).sum() > 60  # halos clear the stroma
        counts.append(int(((luminance(image) < 45) & (diff < -30)).sum()))
    assert 15 < counts[0] < counts[1]
