"""Alpha-matting errors as the Deep Image Matting benchmark computes them (Xu et al., CVPR 2017,
and its MATLAB evaluation code: ``compute_sad_loss``, ``compute_mse_loss``,
``compute_gradient_loss``, ``compute_connectivity_error``), the numbers matting papers report
and DiffuMatting (arXiv:2403.06168, sec. 4) quotes.

Inputs are 8-bit alpha mattes (``uint8``, ``H x W``); the region is the trimap's unknown band
(value 128) or, with no trimap, the whole image. Known mistakes of other ports that these
functions avoid (each has a test): subtracting ``uint8`` arrays (wraps around), dividing a
region's sum by the image's pixel count, normalising the gradient's inputs by 255 instead of
their own range, and picking the largest *background* component in the connectivity error.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric, MetricCollection

UNKNOWN = 128  # the trimap value of the band where the error is measured
GRADIENT_SIGMA = 1.4
CONNECTIVITY_STEP = 0.1
CONNECTIVITY_THETA = 0.15


def matting_region(shape: tuple[int, int], trimap: np.ndarray | None = None) -> np.ndarray:
    """The pixels the errors are summed over: ``trimap == 128``, or all of them without a trimap."""
    if trimap is None:
        return np.ones(shape, dtype=bool)
    if trimap.shape != tuple(shape):
        raise ValueError(f"the trimap is {trimap.shape[1]}x{trimap.shape[0]}, the alpha {shape[1]}x{shape[0]}: "
                         "they must be the same size")
    region = trimap == UNKNOWN
    if not region.any():
        raise ValueError(f"the trimap has no unknown pixels (value {UNKNOWN}): there is nothing to measure")
    return region


def sad(prediction: np.ndarray, target: np.ndarray, region: np.ndarray) -> float:
    """Sum of absolute differences over the region, alpha in [0, 1], reported / 1000."""
    difference = _unit(prediction) - _unit(target)
    return float(np.abs(difference)[region].sum() / 1000.0)


def mse(prediction: np.ndarray, target: np.ndarray, region: np.ndarray) -> float:
    """Mean squared difference over the region's pixels (not the image's), alpha in [0, 1]."""
    difference = _unit(prediction) - _unit(target)
    return float(np.square(difference)[region].sum() / region.sum())


def gradient_error(prediction: np.ndarray, target: np.ndarray, region: np.ndarray, sigma: float = GRADIENT_SIGMA) -> float:
    """Sum over the region of the squared difference of Gaussian-derivative gradient magnitudes,
    each matte first stretched to [0, 1] by its own minimum and maximum (MATLAB's ``mat2gray``),
    reported / 1000."""
    difference = _gradient_magnitude(_stretch(prediction), sigma) - _gradient_magnitude(_stretch(target), sigma)
    return float(np.square(difference)[region].sum() / 1000.0)


def connectivity_error(prediction: np.ndarray, target: np.ndarray, region: np.ndarray,
                       step: float = CONNECTIVITY_STEP, theta: float = CONNECTIVITY_THETA) -> float:
    """Rhemann et al.'s connectivity error (CVPR 2009) as DIM computes it, reported / 1000.

    For each threshold t = step, 2 step, ..., 1: the largest 4-connected component of the
    pixels where both mattes are >= t (the foreground: never the background). A pixel's level
    ``l`` is the threshold just below the first one at which it leaves that component (1 if it
    never does); ``phi = 1 - d`` where ``d = alpha - l >= theta``, else 1; the error sums
    ``|phi_p - phi_g|`` over the region.
    """
    # float32 like the MATLAB code's single(): alpha 51/255 is then >= the threshold 0.2, as there.
    predicted, truth = prediction.astype(np.float32) / np.float32(255), target.astype(np.float32) / np.float32(255)
    thresholds = np.linspace(0.0, 1.0, round(1.0 / step) + 1)
    level = np.full(predicted.shape, -1.0)
    for below, threshold in zip(thresholds[:-1], thresholds[1:]):
        connected = _largest_component((predicted >= threshold) & (truth >= threshold))
        level[(level == -1.0) & ~connected] = below
    level[level == -1.0] = 1.0
    return float(np.abs(_connectivity(predicted, level, theta) - _connectivity(truth, level, theta))[region].sum() / 1000.0)


METRICS = {"sad": sad, "mse": mse, "grad": gradient_error, "conn": connectivity_error}


def matting_errors(prediction: np.ndarray, target: np.ndarray, trimap: np.ndarray | None = None) -> dict[str, float]:
    """All four errors of one matte: ``{"sad", "mse", "grad", "conn"}``."""
    check_alpha(prediction, "the predicted alpha")
    check_alpha(target, "the ground-truth alpha")
    if prediction.shape != target.shape:
        raise ValueError(f"the predicted alpha is {prediction.shape[1]}x{prediction.shape[0]}, the ground truth "
                         f"{target.shape[1]}x{target.shape[0]}: they must be the same size")
    region = matting_region(target.shape, trimap)
    return {name: function(prediction, target, region) for name, function in METRICS.items()}


class MattingError(Metric):
    """The mean over images of one of the DIM errors (``sad``, ``mse``, ``grad``, ``conn``), as
    matting papers average them over a test set; summed across data-parallel ranks."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, error: Literal["sad", "mse", "grad", "conn"], **kwargs) -> None:
        super().__init__(**kwargs)
        if error not in METRICS:
            raise ValueError(f"error must be one of {sorted(METRICS)}, got {error!r}")
        self.error = error
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction: torch.Tensor, target: torch.Tensor, trimap: torch.Tensor | None = None) -> None:
        """``uint8`` mattes ``B x H x W`` (or ``B x 1 x H x W``); ``trimap`` the same shape, or ``None``."""
        predictions, targets = _images(prediction), _images(target)
        trimaps = _images(trimap) if trimap is not None else [None] * len(targets)
        for predicted, truth, band in zip(predictions, targets, trimaps, strict=True):
            check_alpha(predicted, "the predicted alpha")
            check_alpha(truth, "the ground-truth alpha")
            self.total += METRICS[self.error](predicted, truth, matting_region(truth.shape, band))
            self.count += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1.0)


def matting_metrics(**kwargs) -> MetricCollection:
    """The four DIM errors as one collection, keyed ``sad``, ``mse``, ``grad``, ``conn``."""
    return MetricCollection({name: MattingError(name, **kwargs) for name in METRICS})


def _images(batch: torch.Tensor) -> list[np.ndarray]:
    if batch.ndim == 4 and batch.shape[1] == 1:
        batch = batch[:, 0]
    if batch.ndim == 2:
        batch = batch[None]
    if batch.ndim != 3:
        raise ValueError(f"mattes must be B x H x W or B x 1 x H x W, got shape {tuple(batch.shape)}")
    return list(batch.detach().cpu().numpy())


def check_alpha(alpha: np.ndarray, what: str) -> None:
    if alpha.dtype != np.uint8 or alpha.ndim != 2:
        raise ValueError(f"{what} must be an 8-bit single-channel matte (uint8, H x W), got {alpha.dtype} with shape "
                         f"{alpha.shape}")


def gaussian_derivative_kernel(sigma: float = GRADIENT_SIGMA, epsilon: float = 1e-2) -> np.ndarray:
    """DIM's ``gaussgradient`` x kernel: Gaussian along rows times its derivative along columns,
    cut where the Gaussian falls below ``epsilon`` of its peak, scaled to unit L2 norm."""
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * epsilon)))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-offsets**2 / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))
    kernel = np.outer(gauss, -offsets * gauss / sigma**2)
    return kernel / np.sqrt(np.square(kernel).sum())


def _unit(alpha: np.ndarray) -> np.ndarray:
    return alpha.astype(np.float64) / 255.0


def _stretch(alpha: np.ndarray) -> np.ndarray:
    values = alpha.astype(np.float64)
    low, high = values.min(), values.max()
    if high == low:  # mat2gray keeps a constant image as it is; its gradient is zero either way
        return np.clip(values, 0.0, 1.0)
    return (values - low) / (high - low)


def _gradient_magnitude(image: np.ndarray, sigma: float) -> np.ndarray:
    kernel = gaussian_derivative_kernel(sigma)
    # imfilter(..., 'replicate', 'conv'): a true convolution with edge pixels repeated.
    gx = ndimage.convolve(image, kernel, mode="nearest")
    gy = ndimage.convolve(image, kernel.T, mode="nearest")
    return np.sqrt(gx**2 + gy**2)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (ties: the one MATLAB's ``bwconncomp``
    lists first, by column-major order of its first pixel); all false if ``mask`` is empty."""
    # Labelling the transpose numbers components in column-major order, as MATLAB does.
    labels, count = ndimage.label(mask.T)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]  # label 0 is the background: never a candidate
    return (labels == 1 + int(np.argmax(sizes))).T


def _connectivity(alpha: np.ndarray, level: np.ndarray, theta: float) -> np.ndarray:
    distance = alpha - level
    return 1.0 - distance * (distance >= theta)
