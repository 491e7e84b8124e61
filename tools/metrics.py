"""Image-quality and sample-fidelity metrics for postdiff's evaluation tools.

Torch-free on purpose (numpy + onnxruntime only) so that it runs beside the device-side runtime:

* :func:`psnr` -- peak signal-to-noise ratio in dB;
* :func:`ssim` -- mean structural similarity (Wang et al. 2004), matching
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=...)``;
* :func:`frechet_distance` -- the Frechet distance between Gaussians fitted to two feature sets
  (the formula of FID, Heusel et al. 2017), with the matrix square root done by SVD, not scipy;
* :class:`DigitClassifier` -- runs the committed MNIST digit classifier ONNX (labels and the
  penultimate features used for digit-FID);
* :func:`class_adherence` and :func:`reference_fidelity` -- the figures reported by the tools.

Every problem a caller can cause (mismatched shapes, NaNs, a missing model file) raises
:class:`postdiff.errors.InputError` with a message naming the value, what was expected and
the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from postdiff.errors import InputError

__all__ = [
    "PSNR_CAP_DB",
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "DigitClassifier",
    "class_adherence",
    "frechet_distance",
    "psnr",
    "reference_fidelity",
    "ssim",
]

#: Stabilising constants of SSIM (Wang et al. 2004, eq. 7 and 9): C1 = (K1 L)^2, C2 = (K2 L)^2.
SSIM_K1: float = 0.01
SSIM_K2: float = 0.03
#: Standard deviation (pixels) of SSIM's circular-symmetric Gaussian weighting window.
SSIM_SIGMA: float = 1.5
#: Side of the Gaussian window: 2 * int(3.5 * sigma + 0.5) + 1 = 11 taps, as in Wang et al. and
#: in skimage (truncate = 3.5 standard deviations).
SSIM_WINDOW: int = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1
#: Each pair's PSNR is capped at this value before :func:`reference_fidelity` averages them, so
#: that one identical pair (PSNR = inf) does not swamp the mean.
PSNR_CAP_DB: float = 100.0


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def _shape(x: np.ndarray) -> str:
    return "(" + ", ".join(str(d) for d in x.shape) + ")"


def _as_float_array(value: object, name: str) -> np.ndarray:
    """``value`` as a float64 array; InputError for non-numeric dtypes, empty or non-finite data."""
    array = np.asarray(value)
    if array.dtype.kind not in "uif":
        raise InputError(
            f"{name} has dtype {array.dtype}; expected a numeric array (uint8 or float); "
            f"convert it with np.asarray(..., dtype=np.float32)"
        )
    if array.size == 0:
        raise InputError(f"{name} is empty (shape {_shape(array)}); expected at least one value; pass real data")
    result = array.astype(np.float64)  # uint8 -> float before any subtraction (no wrap-around)
    if not np.all(np.isfinite(result)):
        raise InputError(
            f"{name} contains {int(np.count_nonzero(~np.isfinite(result)))} NaN or infinite values; "
            f"expected finite numbers; fix whatever produced it (e.g. a diverged sampler)"
        )
    return result


def _image_pair(a: object, b: object) -> tuple[np.ndarray, np.ndarray]:
    """Two images of one shape as float64 arrays."""
    fa, fb = _as_float_array(a, "image a"), _as_float_array(b, "image b")
    if fa.shape != fb.shape:
        raise InputError(
            f"images have different shapes {_shape(fa)} and {_shape(fb)}; expected the same shape; "
            f"resize or crop one of them to the other's size first"
        )
    return fa, fb


def _check_data_range(data_range: float) -> float:
    try:
        value = float(data_range)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise InputError(
            f"data_range is {data_range!r}; expected a positive finite number (max - min of the pixel "
            f"scale); use 255.0 for uint8 images, 2.0 for [-1, 1] floats, 1.0 for [0, 1] floats"
        )
    return value


# --------------------------------------------------------------------------------------------
# PSNR and SSIM
# --------------------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB between two images of the same shape (uint8 HxW, HxWxC, or float arrays).

    PSNR = 10 log10(L^2 / MSE) with L = ``data_range`` and MSE the mean squared difference over
    every pixel and channel, computed in float64 (so uint8 inputs never wrap around). Returns
    ``inf`` when the images are identical (MSE = 0).

    Args:
        a, b: images of one shape; any numeric dtype.
        data_range: L, the extent of the pixel scale: 255 for uint8, 2.0 for [-1, 1] floats.

    Raises:
        InputError: shapes differ, an image is empty or non-finite, or ``data_range`` is not > 0.
    """
    fa, fb = _image_pair(a, b)
    peak = _check_data_range(data_range)
    mse = float(np.mean((fa - fb) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def _gaussian_taps(sigma: float = SSIM_SIGMA, size: int = SSIM_WINDOW) -> np.ndarray:
    """1-D Gaussian g(x) = exp(-x^2 / (2 sigma^2)), x = -r..r, normalised to sum 1."""
    radius = size // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable Gaussian weighting over the valid region of axes 0 and 1 of ``x`` (H, W, C).

    The 2-D window w(i, j) = g(i) g(j) is applied as two 1-D passes; output pixel (y, x) is the
    weighted sum over the window whose top-left corner is (y, x), so the result has shape
    (H - k + 1, W - k + 1, C) for k taps (no padding is ever read).
    """
    k = len(taps)
    height = x.shape[0] - k + 1
    rows = sum(taps[i] * x[i:i + height] for i in range(k))
    width = x.shape[1] - k + 1
    return sum(taps[j] * rows[:, j:j + width] for j in range(k))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004) between two images of one shape; 1.0 when identical.

    Per pixel and channel (Wang et al. 2004, eq. 13, with the Gaussian weighting of their sec. III-B):

        SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))

    where mu, s^2 and s_ab are means, variances and the covariance weighted by an 11x11 Gaussian
    window (sigma 1.5, normalised to sum 1; population, not sample, moments) and
    C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = ``data_range``.

    Border handling: **valid region**. The SSIM map is evaluated only where the whole 11x11 window
    lies inside the image ((H-10) x (W-10) positions, 22x22 for a 32x32 image) and averaged with
    equal weight. This is exactly what ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L)`` reports: skimage
    filters with padding and then crops 5 pixels off every side before averaging. (skimage keeps
    float32 inputs in float32; this function always works in float64, so results agree to ~1e-6.)

    Colour: a 2-D array is one grayscale image; a 3-D array is channel-last (H, W, C) with C <= 4,
    SSIM is computed per channel and the channel means are averaged (skimage's ``channel_axis=-1``).

    Args:
        a, b: images of one shape, (H, W) or (H, W, C), H and W >= 11; any numeric dtype.
        data_range: L, the extent of the pixel scale: 255 for uint8, 2.0 for [-1, 1] floats.

    Raises:
        InputError: shapes differ, wrong rank, channel-first layout, image smaller than 11x11,
            empty or non-finite data, or ``data_range`` not > 0.
    """
    fa, fb = _image_pair(a, b)
    peak = _check_data_range(data_range)
    if fa.ndim == 2:
        fa, fb = fa[:, :, None], fb[:, :, None]
    elif fa.ndim != 3:
        raise InputError(
            f"SSIM got images of shape {_shape(fa)}; expected (H, W) grayscale or (H, W, C) channel-last; "
            f"compare a batch image by image"
        )
    elif fa.shape[2] > 4:
        raise InputError(
            f"SSIM got images of shape {_shape(fa)} with {fa.shape[2]} channels last; expected (H, W, C) "
            f"channel-last with C <= 4; for channel-first (C, H, W) arrays pass np.moveaxis(x, 0, -1)"
        )
    if min(fa.shape[0], fa.shape[1]) < SSIM_WINDOW:
        raise InputError(
            f"SSIM got images of {fa.shape[0]}x{fa.shape[1]} pixels; expected at least "
            f"{SSIM_WINDOW}x{SSIM_WINDOW} (the Gaussian window); compare larger images or use psnr()"
        )

    taps = _gaussian_taps()
    c1 = (SSIM_K1 * peak) ** 2  # eq. 7
    c2 = (SSIM_K2 * peak) ** 2  # eq. 9

    # Weighted moments (eq. 14-16 with Gaussian weights w, sum w = 1):
    # mu = sum w x, s^2 = sum w x^2 - mu^2, s_ab = sum w a b - mu_a mu_b.
    mu_a = _filter_valid(fa, taps)
    mu_b = _filter_valid(fb, taps)
    var_a = _filter_valid(fa * fa, taps) - mu_a * mu_a
    var_b = _filter_valid(fb * fb, taps) - mu_b * mu_b
    cov_ab = _filter_valid(fa * fb, taps) - mu_a * mu_b

    # eq. 13: luminance x contrast-structure, per pixel and channel.
    ssim_map = ((2.0 * mu_a * mu_b + c1) * (2.0 * cov_ab + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    # eq. 17: mean SSIM per channel over the (valid) map, then the mean over channels.
    per_channel = ssim_map.mean(axis=(0, 1))
    return float(per_channel.mean())


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------

def _centred_features(features: object, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), centred features (N, F)) of an (N, F) feature array, float64."""
    x = _as_float_array(features, name)
    if x.ndim != 2:
        raise InputError(
            f"{name} has shape {_shape(x)}; expected (N, F): one row of F features per sample; "
            f"reshape it with x.reshape(len(x), -1)"
        )
    if x.shape[0] < 2:
        raise InputError(
            f"{name} has {x.shape[0]} sample(s) (shape {_shape(x)}); expected N >= 2 to estimate a "
            f"covariance; pass more samples (hundreds or more for a stable figure)"
        )
    mean = x.mean(axis=0)
    return mean, x - mean


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, F) feature sets (FID's formula).

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})    (Dowson & Landau 1982;
                                                                    Heusel et al. 2017, FID)

    with mu the feature means and S the unbiased sample covariances (divided by N - 1, like
    ``np.cov`` and pytorch-fid). The set sizes may differ; F must match.

    Tr (S_a S_b)^{1/2} is computed without forming a matrix square root and without scipy. With the
    centred data scaled as A = X_a / sqrt(N_a - 1) = U_a diag(s_a) V_a^T (thin SVD), S_a = A^T A,
    and likewise for B:

        Tr (S_a S_b)^{1/2} = Tr (S_a^{1/2} S_b S_a^{1/2})^{1/2} = || S_a^{1/2} S_b^{1/2} ||_*
                           = || diag(s_a) V_a^T V_b diag(s_b) ||_*

    (the eigenvalues of S_a S_b are those of the PSD S_a^{1/2} S_b S_a^{1/2}, the squared singular
    values of S_a^{1/2} S_b^{1/2}; the last step drops orthonormal factors, which keep the nuclear
    norm ||.||_* = sum of singular values). Working on the data's singular values s rather than on
    eigenvalues of S (= s^2) keeps the error at machine precision times ||S|| even when S is rank
    deficient (N <= F): a set against itself gives 0 to ~1e-15 relative, where a square root of
    eigenvalues of products would leave ~1e-8. Tiny negative results from rounding are clipped
    to 0.

    Args:
        features_a, features_b: (N_a, F) and (N_b, F) arrays, N >= 2, finite.

    Returns:
        The squared Frechet distance d^2 (what FID reports), >= 0.

    Raises:
        InputError: not 2-D, fewer than 2 rows, different F, or non-finite values.
    """
    mu_a, xa = _centred_features(features_a, "features_a")
    mu_b, xb = _centred_features(features_b, "features_b")
    if xa.shape[1] != xb.shape[1]:
        raise InputError(
            f"features_a has {xa.shape[1]} features per sample and features_b has {xb.shape[1]}; expected "
            f"the same F; extract both sets with the same feature extractor (same ONNX output)"
        )
    # Thin SVD of the scaled centred data: only V^T and the singular values are needed.
    _, s_a, vt_a = np.linalg.svd(xa / math.sqrt(xa.shape[0] - 1), full_matrices=False)
    _, s_b, vt_b = np.linalg.svd(xb / math.sqrt(xb.shape[0] - 1), full_matrices=False)
    # Tr S = sum of squared singular values of the scaled data.
    trace_a = float(np.sum(s_a * s_a))
    trace_b = float(np.sum(s_b * s_b))
    # Tr (S_a S_b)^{1/2} = nuclear norm of diag(s_a) V_a^T V_b diag(s_b)  (r_a x r_b, r <= min(N, F)).
    cross = (s_a[:, None] * (vt_a @ vt_b.T)) * s_b[None, :]
    trace_sqrt = float(np.sum(np.linalg.svd(cross, compute_uv=False)))
    mean_term = float(np.sum((mu_a - mu_b) ** 2))
    distance = mean_term + trace_a + trace_b - 2.0 * trace_sqrt
    return max(distance, 0.0)


# --------------------------------------------------------------------------------------------
# Digit classifier
# --------------------------------------------------------------------------------------------

class DigitClassifier:
    """Runs the committed digit classifier ONNX with onnxruntime on the CPU.

    The model (``exporter/builtin/digits/classifier/classifier.onnx``) takes input ``"image"``
    (N, 1, 32, 32) float32 in [-1, 1] (background -1) and returns ``"logits"`` (N, 10) and
    ``"features"`` (N, F), the penultimate activations used for digit-FID.
    """

    INPUT: str = "image"
    OUTPUTS: tuple[str, str] = ("logits", "features")
    SIZE: int = 32

    def __init__(self, onnx_path: Path) -> None:
        """Load the model.

        Raises:
            InputError: the file does not exist, cannot be loaded by onnxruntime, or does not have the
                input ``image`` and outputs ``logits`` and ``features``.
        """
        import onnxruntime as ort  # imported here: psnr/ssim/FID users need not load onnxruntime

        path = Path(onnx_path)
        if not path.is_file():
            raise InputError(
                f"digit classifier {path} does not exist; expected the ONNX file written by "
                f"tools/train_classifier.py; pass exporter/builtin/digits/classifier/classifier.onnx or "
                f"train it with tools/train_classifier.py"
            )
        try:
            self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise InputError(
                f"digit classifier {path} cannot be loaded by onnxruntime ({type(exc).__name__}: {exc}); "
                f"expected a valid ONNX model; re-export it with tools/train_classifier.py"
            ) from exc
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [self.INPUT] or not set(self.OUTPUTS) <= set(outputs):
            raise InputError(
                f"digit classifier {path} has inputs {inputs} and outputs {outputs}; expected input "
                f"'{self.INPUT}' and outputs {list(self.OUTPUTS)}; re-export it with tools/train_classifier.py"
            )
        self.path = path

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        """(N, 32, 32) or (N, 1, 32, 32) uint8 [0, 255] or float [-1, 1] -> (N, 1, 32, 32) float32 [-1, 1]."""
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1:] != (1, self.SIZE, self.SIZE):
            raise InputError(
                f"digit images have shape {_shape(np.asarray(images))}; expected (N, 32, 32) or (N, 1, 32, 32); "
                f"pad 28x28 MNIST digits by 2 pixels per side (tools/digits_data.preprocess) and stack them"
            )
        if x.shape[0] == 0:
            raise InputError("digit images hold 0 images (shape (0, ...)); expected N >= 1; pass at least one image")
        if x.dtype == np.uint8:
            # [0, 255] -> [-1, 1], the mapping of tools/digits_data.preprocess.
            return (x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)
        if x.dtype.kind != "f":
            raise InputError(
                f"digit images have dtype {x.dtype}; expected uint8 in [0, 255] or float in [-1, 1]; "
                f"convert with x.astype(np.uint8) or x.astype(np.float32) / 127.5 - 1"
            )
        if not np.all(np.isfinite(x)):
            raise InputError("digit images contain NaN or infinite values; expected floats in [-1, 1]; "
                             "fix whatever produced them")
        low, high = float(x.min()), float(x.max())
        if low < -1.01 or high > 1.01:
            raise InputError(
                f"float digit images span [{low:.3g}, {high:.3g}]; expected [-1, 1] (background -1); pass "
                f"uint8 [0, 255] images instead, or rescale with x / 127.5 - 1"
            )
        return x.astype(np.float32)

    def predict(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Classify digits.

        Args:
            images: (N, 32, 32) or (N, 1, 32, 32). uint8 images are read as [0, 255] and mapped to
                [-1, 1] by x / 127.5 - 1; float images must already be in [-1, 1] (white digit on
                a -1 background, as ``tools/digits_data.preprocess`` makes them).
            batch_size: images per onnxruntime call.

        Returns:
            labels: (N,) int64, the argmax of the logits.
            features: (N, F) float32, the ``features`` output (penultimate layer).

        Raises:
            InputError: wrong shape or dtype, floats outside [-1, 1], no images, or batch_size < 1.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size is {batch_size!r}; expected a positive integer; e.g. 256")
        x = self._prepare(images)
        labels, features = [], []
        for start in range(0, len(x), int(batch_size)):
            logits, feats = self._session.run(list(self.OUTPUTS), {self.INPUT: x[start:start + int(batch_size)]})
            labels.append(np.argmax(logits, axis=1).astype(np.int64))
            features.append(np.asarray(feats, dtype=np.float32))
        return np.concatenate(labels), np.concatenate(features)


# --------------------------------------------------------------------------------------------
# Summary figures
# --------------------------------------------------------------------------------------------

def _as_labels(value: object, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise InputError(
            f"{name} has dtype {array.dtype}; expected integer class labels; convert with .astype(np.int64)"
        )
    return array


def class_adherence(predicted: np.ndarray, requested: np.ndarray) -> float:
    """Share of samples whose predicted class equals the class they were generated for.

    adherence = (1/N) sum_i [predicted_i == requested_i]

    Args:
        predicted: (N,) integer labels (e.g. from :meth:`DigitClassifier.predict`), N >= 1.
        requested: (N,) integer labels, or one integer when every sample asked for the same class.

    Raises:
        InputError: non-integer labels, not 1-D, no samples, or lengths that differ.
    """
    pred = _as_labels(predicted, "predicted")
    req = _as_labels(requested, "requested")
    if pred.ndim != 1 or pred.size == 0:
        raise InputError(
            f"predicted has shape {_shape(pred)}; expected (N,) with N >= 1 labels; pass one label per sample"
        )
    if req.ndim == 0:
        req = np.broadcast_to(req, pred.shape)
    if req.shape != pred.shape:
        raise InputError(
            f"requested has shape {_shape(req)} and predicted {_shape(pred)}; expected one requested label "
            f"per predicted label; pass the label each sample was generated for"
        )
    return float(np.mean(pred == req))


def reference_fidelity(samples: Sequence[np.ndarray], references: Sequence[np.ndarray],
                       data_range: float = 255.0) -> dict[str, float]:
    """PSNR and SSIM of each sample against its reference, averaged over the pairs.

    ``samples[i]`` is compared with ``references[i]`` (e.g. a postdiff image and the baseline image of
    the same prompt and seed). Pairs may differ in shape from one another; within a pair shapes match.

    Averaging of PSNR: an identical pair has PSNR = inf, so each pair's PSNR is capped at
    :data:`PSNR_CAP_DB` (100 dB, far beyond any visible difference; uint8 images that differ by a
    single grey level in one value of a 512x512x3 image score ~107 dB) before the mean is taken. Only when
    *every* pair is identical is ``psnr_db`` inf, matching :func:`psnr`. The number of identical pairs
    is reported separately.

    Args:
        samples, references: equally long, non-empty sequences of images (see :func:`psnr`,
            :func:`ssim` for shapes; SSIM needs images of at least 11x11).
        data_range: pixel scale of both: 255 for uint8, 2.0 for [-1, 1] floats.

    Returns:
        {"psnr_db": mean capped PSNR (inf when all pairs are identical), "ssim": mean SSIM,
        "pairs": number of pairs, "identical_pairs": pairs with PSNR = inf}.

    Raises:
        InputError: the sequences are empty or of different lengths, or any pair is invalid for
            :func:`psnr` / :func:`ssim` (the message then names the pair).
    """
    if len(samples) != len(references) or len(samples) == 0:
        raise InputError(
            f"reference_fidelity got {len(samples)} samples and {len(references)} references; expected equally "
            f"many, at least one; pass one reference image per sample"
        )
    psnrs, ssims = [], []
    for i, (sample, reference) in enumerate(zip(samples, references)):
        try:
            psnrs.append(psnr(sample, reference, data_range))
            ssims.append(ssim(sample, reference, data_range))
        except InputError as exc:
            raise InputError(f"pair {i}: {exc}") from exc
    identical = sum(1 for p in psnrs if math.isinf(p))
    if identical == len(psnrs):
        mean_psnr = math.inf
    else:
        mean_psnr = float(np.mean([min(p, PSNR_CAP_DB) for p in psnrs]))
    return {
        "psnr_db": mean_psnr,
        "ssim": float(np.mean(ssims)),
        "pairs": float(len(psnrs)),
        "identical_pairs": float(identical),
    }
