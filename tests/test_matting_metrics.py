"""The DIM matting errors against values worked out by hand, one test per pitfall of other ports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerdiff.metrics.matting import (
    MattingError,
    connectivity_error,
    gaussian_derivative_kernel,
    gradient_error,
    matting_errors,
    matting_metrics,
    matting_region,
    mse,
    sad,
)


def alpha(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.uint8)


def test_sad_and_mse_do_not_wrap_around_in_uint8():
    prediction, target = alpha([0, 255]), alpha([10, 0])
    region = matting_region(target.shape)
    # |0 - 10| + |255 - 0| = 265 levels (uint8 subtraction would give 246 + 255).
    assert sad(prediction, target, region) == pytest.approx(265 / 255 / 1000)
    assert mse(prediction, target, region) == pytest.approx(((10 / 255) ** 2 + 1.0) / 2)


def test_a_trimap_limits_the_sums_and_the_mean_to_its_unknown_band():
    prediction, target = alpha([0, 255], [255, 100]), alpha([0, 0], [0, 0])
    trimap = alpha([0, 128], [255, 0])  # only the top-right pixel is measured
    region = matting_region(target.shape, trimap)
    assert sad(prediction, target, region) == pytest.approx(1 / 1000)
    assert mse(prediction, target, region) == pytest.approx(1.0)  # divided by 1 pixel, not 4
    assert matting_errors(prediction, target)["mse"] == pytest.approx((2 + (100 / 255) ** 2) / 4)


def test_the_gradient_kernel_is_dims_for_sigma_1_4():
    kernel = gaussian_derivative_kernel(1.4)
    # half-size ceil(1.4 * sqrt(-2 ln(sqrt(2 pi) * 1.4 * 0.01))) = ceil(3.62) = 4
    assert kernel.shape == (9, 9)
    assert np.square(kernel).sum() == pytest.approx(1.0)
    assert np.allclose(kernel, -kernel[:, ::-1]) and np.allclose(kernel, kernel[::-1, :])
    assert kernel[4, 4] == 0.0


def test_the_gradient_error_of_a_step_against_a_flat_matte():
    prediction = np.zeros((6, 12), np.uint8)
    prediction[:, 6:] = 255
    target = np.full((6, 12), 200, np.uint8)  # constant: no gradient at all
    # The image varies along columns only, so the y filter gives 0 and the x filter reduces to a
    # 1-D convolution with the kernel's column sums, edges replicated.
    column_weights = gaussian_derivative_kernel(1.4).sum(axis=0)
    step = [0.0] * 6 + [1.0] * 6
    gx = [sum(column_weights[j + 4] * step[min(max(c - j, 0), 11)] for j in range(-4, 5)) for c in range(12)]
    expected = 6 * sum(value**2 for value in gx) / 1000
    assert gradient_error(prediction, target, matting_region(target.shape)) == pytest.approx(expected)


def test_the_gradient_error_stretches_each_matte_by_its_own_range():
    target = np.zeros((8, 8), np.uint8)
    target[2:6, 3:7] = 200
    prediction = target // 2  # the same shape at half the contrast: identical after min-max stretching
    assert gradient_error(prediction, target, matting_region(target.shape)) == 0.0  # a /255 port gives > 0
    assert gradient_error(np.zeros_like(target), target, matting_region(target.shape)) > 0.0


def test_the_connectivity_error_follows_the_foreground_component_not_the_background():
    # Both mattes agree on a 2-pixel foreground; the background (5 pixels) is the larger region.
    prediction, target = alpha([255, 255, 0, 0, 0, 0, 0]), alpha([255, 255, 0, 0, 0, 0, 255])
    # The component is pixels 0-1 at every threshold: l = 1 there, 0 elsewhere; the target's
    # pixel 6 is 1 - l = 1 >= 0.15 above its level, so phi_g = 0 there, phi_p = 1: one unit.
    # (Picking the background label as the component gives 0.)
    assert connectivity_error(prediction, target, matting_region(target.shape)) == pytest.approx(1 / 1000)


def test_the_connectivity_error_of_soft_alpha():
    prediction, target = alpha([255, 51, 0]), alpha([255, 153, 0])  # 1, 0.2, 0 and 1, 0.6, 0
    # Pixel 1 is in the component at t = 0.1 and 0.2 (51/255 >= 0.2 in single precision) and
    # leaves it at 0.3: l = 0.2. d_p = 0 -> phi_p = 1; d_g = 0.4 >= 0.15 -> phi_g = 0.6.
    assert connectivity_error(prediction, target, matting_region(target.shape)) == pytest.approx(0.4 / 1000, abs=1e-9)


def test_identical_mattes_have_no_error_and_the_metric_averages_over_images():
    target = np.random.default_rng(0).integers(0, 256, (2, 16, 16), dtype=np.uint8)
    assert all(value == 0.0 for value in matting_errors(target[0], target[0]).values())
    prediction = target.copy()
    prediction[1] = 0
    metric = MattingError("sad")
    metric.update(torch.from_numpy(prediction[:, None]), torch.from_numpy(target[:, None]))
    assert float(metric.compute()) == pytest.approx(target[1].astype(np.float64).sum() / 255 / 1000 / 2)
    collection = matting_metrics()
    collection.update(torch.from_numpy(prediction), torch.from_numpy(target))
    assert set(collection.compute()) == {"sad", "mse", "grad", "conn"}


def test_bad_mattes_are_refused_with_what_is_wrong():
    target = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="8-bit single-channel"):
        matting_errors(target.astype(np.uint16), target)
    with pytest.raises(ValueError, match="8-bit single-channel"):
        matting_errors(np.zeros((4, 4, 3), np.uint8), target)
    with pytest.raises(ValueError, match="same size"):
        matting_errors(np.zeros((4, 5), np.uint8), target)
    with pytest.raises(ValueError, match="trimap is 3x4"):
        matting_errors(target, target, np.zeros((4, 3), np.uint8))
    with pytest.raises(ValueError, match="no unknown pixels"):
        matting_errors(target, target, np.full((4, 4), 255, np.uint8))
    assert not math.isnan(matting_errors(target, target)["mse"])


def write_folder(folder, mattes: dict[str, np.ndarray]):
    from PIL import Image

    folder.mkdir()
    for name, matte in mattes.items():
        Image.fromarray(matte).save(folder / f"{name}.png")
    return folder


def run_evaluate(*arguments):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "layerdiff.evaluate", "matting", *map(str, arguments)],
                          capture_output=True, text=True, timeout=120)


def test_the_evaluate_command_scores_matched_files_and_writes_json(tmp_path):
    import json

    rng = np.random.default_rng(1)
    targets = {name: rng.integers(0, 256, (12, 10), dtype=np.uint8) for name in ("a", "b")}
    predictions = {"a": targets["a"], "b": np.zeros((12, 10), np.uint8)}
    trimap = np.zeros((12, 10), np.uint8)
    trimap[3:9, 2:8] = 128
    pred, gt = write_folder(tmp_path / "pred", predictions), write_folder(tmp_path / "gt", targets)
    trimaps = write_folder(tmp_path / "trimap", {"a": trimap, "b": trimap})
    result = run_evaluate("--pred", pred, "--gt", gt, "--trimap", trimaps, "--json", tmp_path / "out.json")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "out.json").read_text())
    assert set(written["files"]) == {"a", "b"} and written["files"]["a"] == {"sad": 0.0, "mse": 0.0, "grad": 0.0, "conn": 0.0}
    expected_b = matting_errors(predictions["b"], targets["b"], trimap)
    assert written["files"]["b"] == pytest.approx(expected_b)
    assert written["mean"]["sad"] == pytest.approx(expected_b["sad"] / 2)
    assert [line.split()[0] for line in result.stdout.splitlines() if line[:1].isalpha()] == ["file", "a", "b", "mean", "wrote"]


def test_the_evaluate_command_names_what_does_not_match(tmp_path):
    from PIL import Image

    matte = np.zeros((8, 8), np.uint8)
    gt = write_folder(tmp_path / "gt", {"a": matte, "b": matte})
    result = run_evaluate("--pred", write_folder(tmp_path / "pred", {"a": matte}), "--gt", gt)
    assert result.returncode == 2 and "--pred lacks 1 name(s) that --gt has: b" in result.stderr

    wrong_size = write_folder(tmp_path / "small", {"a": np.zeros((8, 6), np.uint8), "b": matte})
    result = run_evaluate("--pred", wrong_size, "--gt", gt)
    assert result.returncode == 2 and "a (" in result.stderr and "same size" in result.stderr

    colour = tmp_path / "colour"
    colour.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + np.array([0, 255, 0], np.uint8)).save(colour / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint16) + 300).save(colour / "b.png")
    result = run_evaluate("--pred", colour, "--gt", gt)
    assert result.returncode == 2 and "a.png: is a colour image, not an 8-bit grey matte" in result.stderr

    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + 7).save(colour / "a.png")  # grey stored as RGB: accepted
    result = run_evaluate("--pred", colour, "--gt", gt)
    assert result.returncode == 2 and "b.png: is a 16-bit" in result.stderr

    empty = write_folder(tmp_path / "empty_trimap", {"a": matte, "b": matte})
    result = run_evaluate("--pred", gt, "--gt", gt, "--trimap", empty)
    assert result.returncode == 2 and "no unknown pixels" in result.stderr and "empty_trimap/a.png" in result.stderr
