"""Behaviour tests for the ARNIQA / KADID synthetic distortions in `training.degradations`, in both styles.

Real photos come from scikit-image's bundled sample data (no download), cropped square and resized to 128 px so the
contract tests run in seconds on CPU. The `arniqa` style is also checked against statistics of ARNIQA's own code on
224 px crops (`tests/data/arniqa_reference.json`; how they were made is in `tests/data/README.md`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import degradations as deg
from training.degradations import (
    ALL_DISTORTIONS,
    DEGRADATION_STYLES,
    DISTORTION_GROUPS,
    Distortion,
    apply_composition,
    apply_composition_all_levels,
    apply_composition_levels_from,
    apply_distortion,
    get_distortion,
    level_probabilities,
    sample_composition,
    split_after_last_codec,
)

skimage_data = pytest.importorskip("skimage.data")
stats = pytest.importorskip("scipy.stats")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SIZE = 128

# ARNIQA's table (utils/utils_data.py, `distortion_range`), under this module's names.
EXPECTED_LEVELS = {
    "blur": {
        "gaussian_blur": (0.1, 0.5, 1, 2, 5),
        "lens_blur": (1, 2, 4, 6, 8),
        "motion_blur": (1, 2, 4, 6, 10),
    },
    "color_distortion": {
        "color_diffusion": (1, 3, 6, 8, 12),
        "color_shift": (1, 3, 6, 8, 12),
        "color_saturation1": (0.4, 0.2, 0.1, 0, -0.4),
        "color_saturation2": (1, 2, 3, 6, 9),
    },
    "jpeg": {"jpeg2000": (16, 32, 45, 120, 170), "jpeg": (43, 36, 24, 7, 4)},
    "noise": {
        "white_noise": (0.001, 0.002, 0.003, 0.005, 0.01),
        "white_noise_cc": (0.0001, 0.0005, 0.001, 0.002, 0.003),
        "impulse_noise": (0.001, 0.005, 0.01, 0.02, 0.03),
        "multiplicative_noise": (0.001, 0.005, 0.01, 0.02, 0.05),
    },
    "brightness_change": {
        "brighten": (0.1, 0.2, 0.4, 0.7, 1.1),
        "darken": (0.05, 0.1, 0.2, 0.4, 0.8),
        "mean_shift": (0, 0.08, -0.08, 0.15, -0.15),
    },
    "spatial_distortion": {
        "jitter": (0.05, 0.1, 0.2, 0.5, 1),
        "non_eccentricity_patch": (20, 40, 60, 80, 100),
        "pixelate": (0.01, 0.05, 0.1, 0.2, 0.5),
        "quantization": (20, 16, 13, 10, 7),
        "color_block": (2, 4, 6, 8, 10),
    },
    "sharpness_contrast": {
        "high_sharpen": (1, 2, 3, 6, 12),
        "linear_contrast_change": (0, 0.15, -0.4, 0.3, -0.6),
        "non_linear_contrast_change": (0.4, 0.3, 0.2, 0.1, 0.05),
    },
}

ALL_NAMES = [d.name for d in ALL_DISTORTIONS]
STOCHASTIC = [d.name for d in ALL_DISTORTIONS if d.stochastic]
DETERMINISTIC = [d.name for d in ALL_DISTORTIONS if not d.stochastic]
# Signed parameters: their effect is not ordered by the raw pixel distance; they get dedicated tests below.
SIGNED = {"mean_shift", "linear_contrast_change"}
# ARNIQA quirks that break the ordering by level (see the functions' docstrings): pixelate's corner-aligned
# `nearest` shifts the picture by a scale-dependent fraction of a block, and quantization's fixed thresholds with
# the min-max stretch of the bin index can move a photo's values less with fewer levels.
ARNIQA_UNORDERED = {"pixelate", "quantization"}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Intra-op threading only adds overhead on these small tensors; one thread keeps the file fast on small runners."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _load_photo(name: str, size: int = SIZE) -> torch.Tensor:
    image = Image.fromarray(getattr(skimage_data, name)())
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """``[4, 3, 128, 128]`` float32 RGB in [0, 1]."""
    return torch.stack([_load_photo(name) for name in PHOTOS])


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mae_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).abs().mean(dim=(1, 2, 3))


def _distance_by_level(photos: torch.Tensor, name: str, seed: int = 0, style: str = "arniqa") -> torch.Tensor:
    """`[num_photos, 5]` MAE to the pristine photo, each level with a freshly seeded generator."""
    return torch.stack(
        [_mae_per_image(apply_distortion(photos, name, level, _seeded(seed), style), photos) for level in range(5)],
        dim=1,
    )


def _luma_std(x: torch.Tensor) -> torch.Tensor:
    return deg._luma(x).double().flatten(1).std(dim=1)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_matches_arniqa_table():
    assert list(DISTORTION_GROUPS) == list(EXPECTED_LEVELS)
    assert len(ALL_DISTORTIONS) == 24
    assert len(set(ALL_NAMES)) == 24
    for group, entries in DISTORTION_GROUPS.items():
        assert [d.name for d in entries] == list(EXPECTED_LEVELS[group])
        for d in entries:
            assert isinstance(d, Distortion)
            assert d.group == group
            assert d.levels == pytest.approx(EXPECTED_LEVELS[group][d.name])
            assert get_distortion(d.name) is d
    assert [d.name for d in ALL_DISTORTIONS] == [n for g in EXPECTED_LEVELS.values() for n in g]


def test_get_distortion_rejects_unknown_names():
    with pytest.raises(KeyError, match="gaussian_blur"):
        get_distortion("gaublur")


def test_distortion_is_frozen():
    with pytest.raises(AttributeError):
        get_distortion("jpeg").levels = (1, 2, 3, 4, 5)


# ------------------------------------------------------------------------------------------- monotonicity
@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", [n for n in DETERMINISTIC if n not in SIGNED])
def test_distance_to_pristine_grows_with_level(photos, name, style):
    if style == "arniqa" and name in ARNIQA_UNORDERED:
        pytest.skip(f"ARNIQA's {name} is not ordered by level: test_arniqa_style_matches_arniqa_deterministic")
    distance = _distance_by_level(photos, name, style=style)
    steps = distance[:, 1:] - distance[:, :-1]
    # Non-decreasing for every photo (1e-6 absorbs float noise between levels that coincide, e.g. identities)...
    assert (steps >= -1e-6).all(), f"{name}: MAE by level\n{distance}"
    # ...and the strongest level clearly stronger than the mildest one.
    assert (distance[:, 4] > distance[:, 0] + 1e-3).all(), f"{name}: MAE by level\n{distance}"


@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", STOCHASTIC)
def test_expected_distance_to_pristine_grows_with_level(photos, name, style):
    # For a random distortion the parameter sets the *expected* strength: one realisation need not be ordered on
    # every photo. A block may overwrite an earlier block with a colour closer to the photo; a green-channel shift
    # wider than the thin structures of a photo (the rocket's) saturates and then fluctuates with the rounding of
    # the shift vector. So: the MAE averaged over 4 photos x 4 seeds is non-decreasing, and every single
    # realisation is clearly stronger at level 5 than at level 1.
    distance = torch.stack([_distance_by_level(photos, name, seed, style) for seed in range(4)])  # [seeds, photos, 5]
    expected = distance.mean(dim=(0, 1))
    assert (expected[1:] >= expected[:-1]).all(), f"{name}: mean MAE by level {expected}"
    assert (distance[..., 4] > distance[..., 0] + 1e-3).all(), f"{name}: MAE by level\n{distance}"


@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", ["impulse_noise", "non_eccentricity_patch", "color_block"])
def test_affected_area_grows_with_level_for_every_realisation(photos, name, style):
    # For the distortions that corrupt a random set of pixels, the size of that set is what the level controls,
    # and with level-independent draws the sets are nested: the fraction of changed pixels never decreases.
    for seed in range(4):
        changed = torch.stack(
            [
                (apply_distortion(photos, name, level, _seeded(seed), style) != photos)
                .any(dim=1)
                .double()
                .mean(dim=(1, 2))
                for level in range(5)
            ],
            dim=1,
        )
        assert (changed[:, 1:] >= changed[:, :-1]).all(), f"{name}, seed {seed}: changed fraction\n{changed}"
        assert (changed[:, 4] > 1.5 * changed[:, 0]).all(), f"{name}, seed {seed}: changed fraction\n{changed}"


def test_mean_shift_grows_with_the_magnitude_of_the_shift(photos):
    # ARNIQA's shifts are (0, .08, -.08, .15, -.15): pairs of equal magnitude and opposite sign. Clipping at 0 and 1
    # makes the pixel distance of +s and -s differ with the photo's histogram, so the raw MAE is not ordered inside
    # a pair. What the parameters intend is a larger |shift| -> larger effect, in the direction of the sign.
    distance = _distance_by_level(photos, "mean_shift")
    magnitude_groups = [[0], [1, 2], [3, 4]]
    for weaker, stronger in pairwise(magnitude_groups):
        assert (distance[:, weaker].max(dim=1).values < distance[:, stronger].min(dim=1).values).all(), distance
    assert torch.equal(apply_distortion(photos, "mean_shift", 0), photos)  # shift 0 is the identity
    for level, shift in enumerate(get_distortion("mean_shift").levels):
        change = (apply_distortion(photos, "mean_shift", level).double() - photos.double()).mean(dim=(1, 2, 3))
        if shift != 0:
            assert (torch.sign(change) == np.sign(shift)).all()
            # Away from the clipping bounds every value moves by exactly `shift`.
            unclipped = (photos > abs(shift)) & (photos < 1 - abs(shift))
            moved = apply_distortion(photos, "mean_shift", level) - photos
            torch.testing.assert_close(moved[unclipped], torch.full_like(moved[unclipped], shift))


def test_linear_contrast_change_grows_in_each_direction(photos):
    # ARNIQA's amounts (0, .15, -.4, .3, -.6) alternate between raising (>= 0) and lowering (< 0) contrast, with
    # knots (0.3, 0.25 - a/4) and (0.7, 0.75 + a/4): the curve's offset from the identity at the knots is
    # |0.05 + a/4| = .05, .0875, .05, .125, .1, so *no* pixel distance to the pristine image is monotone over
    # the five levels (levels 1 and 3 are mirror images of the identity). The ordering the parameters do express
    # is the size of the contrast change within each direction, measured by the RMS contrast (luma std):
    # raising levels 1 < 2 < 4 all increase it more and more, lowering levels 3 < 5 decrease it more and more.
    pristine = _luma_std(photos)
    std = torch.stack([_luma_std(apply_distortion(photos, "linear_contrast_change", lvl)) for lvl in range(5)], 1)
    assert (pristine < std[:, 0]).all() and (std[:, 0] < std[:, 1]).all() and (std[:, 1] < std[:, 3]).all(), std
    assert (std[:, 2] < pristine).all() and (std[:, 4] < std[:, 2]).all(), std
    # And, as for every distortion, the last level is further from the photo than the first.
    distance = _distance_by_level(photos, "linear_contrast_change")
    assert (distance[:, 4] > distance[:, 0] + 1e-3).all(), distance


def test_tone_curves_follow_matlab_spline():
    interpolate = pytest.importorskip("scipy.interpolate")
    ramp = torch.linspace(0, 1, 257, dtype=torch.float64).repeat(3, 1).view(1, 3, 1, 257)
    grid = ramp[0, 0, 0].numpy()
    for level, amount in enumerate(get_distortion("linear_contrast_change").levels):
        knots = [0.0, 0.25 - amount / 4, 0.5, 0.75 + amount / 4, 1.0]
        expected = interpolate.CubicSpline([0, 0.3, 0.5, 0.7, 1], knots, bc_type="not-a-knot")(grid)
        out = apply_distortion(ramp, "linear_contrast_change", level)[0, 0, 0].numpy()
        np.testing.assert_allclose(out, np.clip(expected, 0, 1), atol=1e-10)
    for level, amount in enumerate(get_distortion("darken").levels):
        parabola = np.polyfit([0, 0.5, 1], [0, 0.5 - amount / 2, 1], 2)
        out = apply_distortion(ramp, "darken", level)[0, 1, 0].numpy()
        np.testing.assert_allclose(out, np.clip(np.polyval(parabola, grid), 0, 1), atol=1e-10)


def test_non_linear_contrast_change_maps_onto_the_offset_range():
    ramp = torch.linspace(0, 1, 101).repeat(3, 1).view(1, 3, 1, 101)
    for level, offset in enumerate(get_distortion("non_linear_contrast_change").levels):
        out = apply_distortion(ramp, "non_linear_contrast_change", level)
        assert out.min().item() == pytest.approx(0.5 - offset, abs=1e-6)
        assert out.max().item() == pytest.approx(0.5 + offset, abs=1e-6)


# ----------------------------------------------------------------------------------------------- randomness
@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", ALL_NAMES)
def test_same_seed_gives_bit_identical_output(photos, name, style):
    x = photos[:2]
    first = apply_distortion(x, name, 3, _seeded(123), style)
    second = apply_distortion(x, name, 3, _seeded(123), style)
    assert torch.equal(first, second)


@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", STOCHASTIC)
def test_different_seeds_give_different_output(photos, name, style):
    x = photos[:2]
    first, second = (apply_distortion(x, name, 4, _seeded(seed), style) for seed in (1, 2))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_distortions_ignore_the_generator(photos, name, style):
    x = photos[:2]
    reference = apply_distortion(x, name, 4, style=style)
    assert torch.equal(reference, apply_distortion(x, name, 4, _seeded(7), style))
    assert not torch.equal(reference, x)


@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", STOCHASTIC)
def test_random_distortions_require_a_generator(photos, name, style):
    with pytest.raises(ValueError, match="Generator"):
        apply_distortion(photos[:1], name, 0, style=style)


def test_global_rng_is_untouched(photos):
    torch.manual_seed(42)
    before = torch.get_rng_state()
    for name in STOCHASTIC:
        for style in DEGRADATION_STYLES:
            apply_distortion(photos[:1], name, 2, _seeded(0), style)
    sample_composition(_seeded(0))
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("style", DEGRADATION_STYLES)
def test_impulse_noise_masks_are_nested_across_levels(photos, style):
    # Level-independent draws: with one seed, the values corrupted at a level stay corrupted at every higher one.
    corrupted = [apply_distortion(photos, "impulse_noise", lvl, _seeded(5), style) != photos for lvl in range(5)]
    for lower, higher in pairwise(corrupted):
        assert (lower & ~higher).sum() == 0
        assert higher.sum() > lower.sum()
    density = corrupted[-1].double().mean().item()
    # Some hits land on values that already were 0 or 1 (and ARNIQA's positions may repeat): a bit under 3%.
    assert 0.025 < density < 0.031


@pytest.mark.parametrize("name", ["white_noise", "white_noise_cc", "multiplicative_noise"])
def test_gaussian_noise_has_the_requested_variance(name):
    flat = torch.full((2, 3, 96, 96), 0.5, dtype=torch.float64)
    for level, variance in enumerate(get_distortion(name).levels):
        noise = apply_distortion(flat, name, level, _seeded(level)) - flat
        if name == "multiplicative_noise":
            noise = noise / 0.5
        if name == "white_noise_cc":
            # Equal variance in Y, Cb and Cr: convert the RGB residual back to YCbCr to measure it.
            noise = deg.rgb_to_ycbcr(flat + noise) - deg.rgb_to_ycbcr(flat)
        assert noise.var().item() == pytest.approx(variance, rel=0.05)


# --------------------------------------------------------------------------------------- tensor contract
@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_shape_dtype_device_and_range_are_preserved(photos, name, dtype, style):
    x = photos[:2, :, :96, :80].to(dtype)  # non-square on purpose
    original = x.clone()
    for level in (0, 4):
        y = apply_distortion(x, name, level, _seeded(0), style)
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert torch.isfinite(y).all()
        assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(x, original), "the input must not be modified in place"


@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_batch_equals_images_processed_alone(photos, name, style):
    x = photos[:2]
    together = apply_distortion(x, name, 3, style=style)
    alone = torch.cat([apply_distortion(x[i : i + 1], name, 3, style=style) for i in range(2)])
    # Convolution kernels may accumulate in a different order for another batch size (x6 for high_sharpen's gain).
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", ALL_NAMES)
def test_per_image_levels(photos, name, style):
    x = photos[:3]
    if get_distortion(name).stochastic:
        # One level for the whole batch as a tensor == the scalar path, random draws included.
        same = torch.tensor([2, 2, 2])
        batched, scalar = (apply_distortion(x, name, level, _seeded(3), style) for level in (same, 2))
        assert torch.equal(batched, scalar)
    else:
        levels = torch.tensor([4, 0, 2])
        mixed = apply_distortion(x, name, levels, style=style)
        alone = torch.cat([apply_distortion(x[i : i + 1], name, int(levels[i]), style=style) for i in range(3)])
        torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=0)


def test_invalid_arguments_are_rejected(photos):
    with pytest.raises(ValueError, match="level"):
        apply_distortion(photos, "jpeg", 5)
    with pytest.raises(ValueError, match="level"):
        apply_distortion(photos, "jpeg", -1)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        apply_distortion(photos[0], "jpeg", 0)
    with pytest.raises(TypeError):
        apply_distortion((photos * 255).to(torch.uint8), "jpeg", 0)
    with pytest.raises(ValueError, match="per-image"):
        apply_distortion(photos, "jpeg", torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="arniqa"):
        apply_distortion(photos, "jpeg", 0, style="kadid")


@pytest.mark.parametrize("style", DEGRADATION_STYLES)
def test_small_images_are_supported(style):
    x = torch.rand(2, 3, 24, 40, generator=_seeded(0))
    for name in ALL_NAMES:
        y = apply_distortion(x, name, 4, _seeded(0), style)
        assert y.shape == x.shape


# ----------------------------------------------------------------------------------- individual semantics
def test_colour_space_round_trips():
    x = torch.rand(2, 3, 16, 16, generator=_seeded(0), dtype=torch.float64)
    torch.testing.assert_close(deg.lab_to_rgb(deg.rgb_to_lab(x)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(deg.hsv_to_rgb(deg.rgb_to_hsv(x)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(deg.ycbcr_to_rgb(deg.rgb_to_ycbcr(x)), x, atol=1e-9, rtol=0)
    # Reference CIELAB values (D65) for white and sRGB primaries.
    colours = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    lab = deg.rgb_to_lab(colours.view(4, 3, 1, 1)).view(4, 3)
    expected = torch.tensor(
        [[100.0, 0.0, 0.0], [53.24, 80.09, 67.20], [87.73, -86.18, 83.18], [32.30, 79.19, -107.86]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(lab, expected, atol=0.05, rtol=0)


def test_clean_quantization_uses_at_most_the_requested_number_of_values(photos):
    for level, count in enumerate(get_distortion("quantization").levels):
        out = apply_distortion(photos, "quantization", level, style="clean")
        for image in out:
            for channel in image:
                assert 2 <= channel.unique().numel() <= count


def test_color_saturation1_at_zero_removes_all_colour(photos):
    grey = apply_distortion(photos, "color_saturation1", 3)  # factor 0
    assert (grey.max(dim=1).values - grey.min(dim=1).values).max() < 1e-6
    # Value (the max channel) is what HSV keeps.
    torch.testing.assert_close(grey[:, 0], photos.max(dim=1).values, atol=1e-6, rtol=0)


def test_blur_kernels_are_normalised_and_identity_at_the_mildest_settings(photos):
    torch.testing.assert_close(deg._disk_kernel(8.0).sum().item(), 1.0)
    kernels = deg._motion_kernels(10.0, torch.rand(4, generator=_seeded(0)) * np.pi)
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(4))
    # Motion blur of length 1 is the identity, whatever the angle; a flat image survives every blur.
    torch.testing.assert_close(apply_distortion(photos, "motion_blur", 0, _seeded(0)), photos, atol=1e-6, rtol=0)
    flat = torch.full((1, 3, 40, 40), 0.3)
    for name in ("gaussian_blur", "lens_blur", "motion_blur"):
        torch.testing.assert_close(apply_distortion(flat, name, 4, _seeded(0)), flat, atol=1e-6, rtol=0)


@pytest.mark.parametrize("style", DEGRADATION_STYLES)
def test_color_shift_only_moves_the_green_channel(photos, style):
    out = apply_distortion(photos, "color_shift", 4, _seeded(0), style)
    assert torch.equal(out[:, [0, 2]], photos[:, [0, 2]])
    assert not torch.equal(out[:, 1], photos[:, 1])


def test_codecs_round_trip_through_pillow(photos):
    # JPEG quality 4 produces 8x8 block structure: the mean step across block borders exceeds the step inside.
    out = apply_distortion(photos, "jpeg", 4)
    rows = (out[..., 1:, :] - out[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    border, inner = rows[7::8].mean(), torch.cat([rows[i::8] for i in range(7)]).mean()
    assert border > 1.5 * inner
    # Both codecs return 8-bit values.
    for name in ("jpeg", "jpeg2000"):
        y = apply_distortion(photos[:1], name, 2) * 255
        torch.testing.assert_close(y, y.round(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------- composition
def test_sample_composition_structure():
    group_of = {d.name: d.group for d in ALL_DISTORTIONS}
    lengths, level_counts, shuffled = Counter(), Counter(), False
    group_rank = {g: i for i, g in enumerate(DISTORTION_GROUPS)}
    for seed in range(400):
        composition = sample_composition(_seeded(seed))
        assert 1 <= len(composition) <= 7
        groups = [group_of[name] for name, _ in composition]
        assert len(set(groups)) == len(groups), composition
        assert all(0 <= level < 5 for _, level in composition)
        lengths[len(composition)] += 1
        level_counts.update(level for _, level in composition)
        shuffled |= [group_rank[g] for g in groups] != sorted(group_rank[g] for g in groups)
    assert set(lengths) == set(range(1, 8))  # every size from 1 to max_groups occurs
    assert shuffled  # order of application is random, not the registry's
    total = sum(level_counts.values())
    frequencies = torch.tensor([level_counts[i] / total for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(frequencies, level_probabilities(), atol=0.03, rtol=0)
    assert frequencies[0] > frequencies[4]


def test_sample_composition_respects_limits_and_seed():
    for seed in range(100):
        composition = sample_composition(_seeded(seed), max_groups=3, num_levels=2)
        assert 1 <= len(composition) <= 3
        assert all(level in (0, 1) for _, level in composition)
    assert sample_composition(_seeded(9)) == sample_composition(_seeded(9))
    assert len({tuple(sample_composition(_seeded(s))) for s in range(20)}) > 10
    with pytest.raises(ValueError):
        sample_composition(_seeded(0), max_groups=8)
    with pytest.raises(ValueError):
        sample_composition(_seeded(0), num_levels=0)


def test_every_distortion_is_reachable_by_sampling():
    seen = {name for seed in range(300) for name, _ in sample_composition(_seeded(seed))}
    assert seen == set(ALL_NAMES)


def test_apply_composition_is_deterministic_and_ordered(photos):
    composition = [("color_block", 0), ("gaussian_blur", 1), ("white_noise", 2)]
    first = apply_composition(photos, composition, 3, _seeded(11))
    assert torch.equal(first, apply_composition(photos, composition, 3, _seeded(11)))
    assert not torch.equal(first, apply_composition(photos, composition, 3, _seeded(12)))
    # Explicit chaining with one generator reproduces it: steps run in order, each at the given level.
    g = _seeded(11)
    chained = photos
    for name, _ in composition:
        chained = apply_distortion(chained, name, 3, g)
    assert torch.equal(first, chained)
    # The order matters (blur then noise != noise then blur).
    reordered = apply_composition(photos, composition[::-1], 3, _seeded(11))
    assert not torch.equal(first, reordered)


def test_apply_composition_uses_sampled_levels_when_no_level_is_given(photos):
    composition = [("gaussian_blur", 3), ("darken", 1)]
    expected = apply_distortion(apply_distortion(photos, "gaussian_blur", 3), "darken", 1)
    assert torch.equal(apply_composition(photos, composition, None), expected)
    # Bare names are accepted with an explicit level, rejected without one.
    assert torch.equal(
        apply_composition(photos, ["gaussian_blur", "darken"], 2),
        apply_composition(photos, composition, 2),
    )
    with pytest.raises(ValueError, match="level"):
        apply_composition(photos, ["gaussian_blur"], None)


def test_composition_at_all_levels_shares_randomness_and_grows(photos):
    composition = [("motion_blur", 0), ("impulse_noise", 0), ("jpeg", 0)]
    stack = apply_composition_all_levels(photos, composition, seed=3)
    assert stack.shape == (5, *photos.shape)
    for level in range(5):
        assert torch.equal(stack[level], apply_composition(photos, composition, level, _seeded(3)))
    distance = torch.stack([_mae_per_image(stack[level], photos) for level in range(5)], dim=1)
    assert (distance[:, 1:] >= distance[:, :-1]).all(), distance
    assert torch.equal(stack, apply_composition_all_levels(photos, composition, seed=3))


def test_split_after_last_codec():
    noisy_jpeg = [("white_noise", 2), ("jpeg", 1), ("gaussian_blur", 0), ("jpeg2000", 3), ("impulse_noise", 4)]
    assert split_after_last_codec(noisy_jpeg) == (noisy_jpeg[:4], noisy_jpeg[4:])
    assert split_after_last_codec(["darken", "jpeg"]) == (["darken", "jpeg"], [])
    assert split_after_last_codec([("motion_blur", 0), ("darken", 1)]) == ([], [("motion_blur", 0), ("darken", 1)])


@pytest.mark.parametrize(
    "composition",
    [
        # random draws before and after the codec: the tail must continue the head's generator, not restart it
        [("impulse_noise", 0), ("jpeg", 0), ("white_noise", 0), ("motion_blur", 0)],
        [("color_shift", 0), ("jitter", 0), ("darken", 0)],  # no codec: the whole composition is the tail
        [("white_noise", 0), ("jpeg2000", 0)],  # codec last: nothing left for the tail
    ],
)
def test_head_then_tail_from_saved_generator_states_is_the_whole_composition(photos, composition):
    whole = apply_composition_all_levels(photos[:2], composition, seed=11)
    head, tail = split_after_last_codec(composition)
    generators = [_seeded(11) for _ in range(5)]
    partial = torch.stack([apply_composition(photos[:2], head, level, g) for level, g in enumerate(generators)])
    resumed = apply_composition_levels_from(partial if head else photos[:2], tail, [g.get_state() for g in generators])
    assert torch.equal(resumed, whole)
    # A fresh generator for the tail would give other noise: the states are what carries the realisation over.
    if head and any(get_distortion(name).stochastic for name, _ in tail):
        restarted = apply_composition_levels_from(partial, tail, [_seeded(11).get_state() for _ in range(5)])
        assert not torch.equal(restarted, whole)


# ------------------------------------------------------------------------------- against ARNIQA's own code
REFERENCE_PATH = Path(__file__).parent / "data" / "arniqa_reference.json"
# ARNIQA's names (utils/utils_data.py `distortion_functions`) for this module's.
ARNIQA_NAMES = dict(
    zip(
        ALL_NAMES,
        [
            *("gaublur", "lensblur", "motionblur", "colordiff", "colorshift", "colorsat1", "colorsat2"),
            *("jpeg2000", "jpeg", "whitenoise", "whitenoiseCC", "impulsenoise", "multnoise", "brighten", "darken"),
            *("meanshift", "jitter", "noneccpatch", "pixelate", "quantization", "colorblock", "highsharpen"),
            *("lincontrchange", "nonlincontrchange"),
        ],
        strict=True,
    )
)
PSNR_CAP = 100.0  # identities (infinite PSNR) compare equal
REFERENCE_CROP = 224
REALISATIONS = 16  # our realisations per photo and level of a random distortion


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE_PATH.read_text())


@pytest.fixture(scope="module")
def reference_crops(reference) -> torch.Tensor:
    """The reference's centred 224x224 crops, `[photos, 3, 224, 224]` float32 (`/ 255` as torchvision's ToTensor)."""
    crops = []
    for name in reference["meta"]["photos"]:
        image = getattr(skimage_data, name)()
        top, left = (image.shape[0] - REFERENCE_CROP) // 2, (image.shape[1] - REFERENCE_CROP) // 2
        patch = np.ascontiguousarray(image[top : top + REFERENCE_CROP, left : left + REFERENCE_CROP])
        crops.append(torch.from_numpy(patch).permute(2, 0, 1).float() / 255.0)
    return torch.stack(crops)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per image PSNR in dB (peak 1), capped at `PSNR_CAP`."""
    mse = (a.double() - b.double()).square().mean(dim=(1, 2, 3))
    return np.minimum((10 * torch.log10(1 / mse)).numpy(), PSNR_CAP)


def _arniqa_psnr(reference: dict, name: str, photo: str, level: int) -> np.ndarray:
    values = reference["distortions"][ARNIQA_NAMES[name]]["photos"][photo][level]["psnr"]
    return np.minimum(np.asarray(values, dtype=np.float64), PSNR_CAP)


def _consistent(ours: np.ndarray, theirs: np.ndarray) -> tuple[bool, str]:
    """Whether two samples of per-seed PSNRs look like one distribution.

    Both conditions: the means differ by at most 0.25 dB plus four standard errors of the difference (Welch), and a
    two-sample Kolmogorov-Smirnov test does not reject at p < 1e-3 (shape and spread, e.g. a bimodal quirk). The
    PSNRs are first rounded to 0.01 dB: several distortions take a few values only (one per color_shift offset, for
    instance), and two implementations land on them with different float rounding, which would otherwise put all of
    one sample's copies of a value before the other's. With ties the test is conservative.
    """
    ours, theirs = np.round(ours, 2), np.round(theirs, 2)
    standard_error = math.sqrt(ours.var(ddof=1) / len(ours) + theirs.var(ddof=1) / len(theirs))
    difference = ours.mean() - theirs.mean()
    p_value = stats.ks_2samp(ours, theirs).pvalue
    ok = abs(difference) <= 0.25 + 4 * standard_error and p_value >= 1e-3
    return ok, f"mean {ours.mean():.2f} vs ARNIQA {theirs.mean():.2f} dB (SE {standard_error:.2f}), KS p {p_value:.1e}"


def _realisations(reference_crops: torch.Tensor, name: str, level: int, style: str) -> np.ndarray:
    """`[REALISATIONS, photos]` PSNRs: every photo repeated in one batch, each copy with its own random draws."""
    batch = reference_crops.repeat(REALISATIONS, 1, 1, 1)
    out = apply_distortion(batch, name, level, _seeded(2024), style)
    return _psnr(out, batch).reshape(REALISATIONS, len(reference_crops))


def test_reference_covers_every_distortion_and_level(reference):
    assert set(reference["distortions"]) == set(ARNIQA_NAMES.values())
    for name in ALL_NAMES:
        entry = reference["distortions"][ARNIQA_NAMES[name]]
        assert entry["random"] == get_distortion(name).stochastic, name
        assert entry["levels"] == pytest.approx(get_distortion(name).levels), name
        assert all(len(levels) == 5 for levels in entry["photos"].values())


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_arniqa_style_matches_arniqa_deterministic(reference, reference_crops, name):
    # PSNR within 0.5 dB and MAD within 5 % of ARNIQA's own function, for every photo and level.
    for level in range(5):
        out = apply_distortion(reference_crops, name, level, style="arniqa")
        psnr, mad = _psnr(out, reference_crops), _mae_per_image(out, reference_crops).numpy()
        for index, photo in enumerate(reference["meta"]["photos"]):
            theirs = _arniqa_psnr(reference, name, photo, level)[0]
            their_mad = reference["distortions"][ARNIQA_NAMES[name]]["photos"][photo][level]["mad"][0]
            where = f"{name} level {level + 1} on {photo}"
            assert abs(psnr[index] - theirs) <= 0.5, f"{where}: PSNR {psnr[index]:.2f} vs ARNIQA {theirs:.2f} dB"
            assert mad[index] == pytest.approx(their_mad, rel=0.05, abs=1e-5), f"{where}: MAD"


@pytest.mark.parametrize("name", STOCHASTIC)
def test_arniqa_style_matches_arniqa_random(reference, reference_crops, name):
    # Per photo and level, our PSNRs over realisations against ARNIQA's over seeds (see `_consistent`).
    for level in range(5):
        ours = _realisations(reference_crops, name, level, "arniqa")
        for index, photo in enumerate(reference["meta"]["photos"]):
            ok, detail = _consistent(ours[:, index], _arniqa_psnr(reference, name, photo, level))
            assert ok, f"{name} level {level + 1} on {photo}: {detail}"


@pytest.mark.parametrize(
    "name, level",
    [("pixelate", 0), ("quantization", 2), ("color_saturation2", 0), ("color_diffusion", 2), ("high_sharpen", 0)],
)
def test_clean_style_is_measurably_not_arniqa(reference, reference_crops, name, level):
    # The comparison above has the power to see the quirks: the clean versions fail it.
    psnr = _psnr(apply_distortion(reference_crops, name, level, style="clean"), reference_crops)
    theirs = [_arniqa_psnr(reference, name, photo, level)[0] for photo in reference["meta"]["photos"]]
    assert np.abs(psnr - np.asarray(theirs)).max() > 0.5, (psnr, theirs)


@pytest.mark.parametrize("name", ["color_shift", "non_eccentricity_patch"])
def test_clean_style_of_random_distortions_is_measurably_not_arniqa(reference, reference_crops, name):
    verdicts = [
        _consistent(ours[:, index], _arniqa_psnr(reference, name, photo, level))[0]
        for level in range(5)
        for ours in [_realisations(reference_crops, name, level, "clean")]
        for index, photo in enumerate(reference["meta"]["photos"])
    ]
    assert not all(verdicts)


def test_arniqa_quantization_uses_fixed_thresholds_and_stretches_the_bin_index():
    ramp = (torch.arange(256, dtype=torch.float32) / 255).repeat(3, 1).view(1, 3, 1, 256)
    for level, count in enumerate(get_distortion("quantization").levels):
        thresholds = [int(255 * k / count) for k in range(1, int(count))]
        # ARNIQA's bucketize: 0 for a value of exactly 0, else 1 + the number of thresholds below the value.
        index = torch.tensor([0 if v == 0 else 1 + sum(t < v for t in thresholds) for v in range(256)])
        expected = (index / index.max()).float().expand(3, 256)
        out = apply_distortion(ramp, "quantization", level, style="arniqa")[0, :, 0]
        torch.testing.assert_close(out, expected)


def test_arniqa_motion_blur_kernels_sum_to_one_along_a_line():
    for length in get_distortion("motion_blur").levels:
        for angle in (0, 45, 90, 137, 180):
            kernel = deg._arniqa_motion_kernel(int(length), angle)
            assert kernel.shape[0] % 2 == 1 and kernel.shape[1] % 2 == 1
            assert kernel.sum() == pytest.approx(1.0, abs=1e-9)
            # A horizontal (0 or 180 degrees) kernel is one row; a vertical one, one column.
            if angle in (0, 180):
                assert (kernel.sum(axis=1) > 0).sum() == 1
            if angle == 90:
                assert (kernel.sum(axis=0) > 0).sum() == 1


# --------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("style", DEGRADATION_STYLES)
@pytest.mark.parametrize("name", ALL_NAMES)
def test_cuda_matches_cpu(photos, name, style):
    x = photos[:2]
    # ARNIQA truncates some Lab round trips to 8 bits: a value within rounding of a step falls one step (1/255) lower.
    rare = 2e-2 if style == "arniqa" and name in ("color_diffusion", "color_saturation2") else 1e-3
    for level in (0, 4):
        on_cpu = apply_distortion(x, name, level, _seeded(4), style)
        on_gpu = apply_distortion(x.cuda(), name, level, _seeded(4), style)  # a CPU generator: identical draws
        assert on_gpu.device.type == "cuda"
        difference = (on_gpu.cpu() - on_cpu).abs()
        # Float (and TF32 convolution) rounding differs between devices; a value sitting exactly on a quantisation
        # threshold may land in the neighbouring bin, so allow a vanishing fraction of larger differences.
        assert difference.mean() < 1e-4, f"{name} level {level}: mean |diff| {difference.mean():.2e}"
        assert (difference > 2e-3).double().mean() < rare, f"{name} level {level}: max |diff| {difference.max():.2e}"
    # A CUDA generator works too and stays on the device.
    out = apply_distortion(x.cuda(), name, 4, torch.Generator(device="cuda").manual_seed(0), style)
    assert out.device.type == "cuda" and out.shape == x.shape
