"""Text-to-image generation from a bundle, torch-free: tokenize, encode, denoise, decode.

Plain generation is a schedule too (:func:`~postdiff.runtime.schedule.plain_schedule`), run by the same executor as every
other: its loop mirrors diffusers' ``StableDiffusionPipeline`` step for step (same guidance formula,
same order of scheduler calls), so that with the same initial latents the results agree to float
rounding. Shapes and dtypes come from the manifest; roles and tensor names from ``names``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postdiff.errors import InputError
from postdiff.runtime.conditioning import Conditioning, SdxlPromptEncoder, SizeConditioning
from postdiff.runtime.executor import ScheduleExecutor
from postdiff.runtime.image import to_uint8
from postdiff.runtime.manifest import Manifest, load_manifest
from postdiff.runtime.names import HIDDEN_STATES, IMAGE, INPUT_IDS, LATENTS, TEXT_ENCODER, VAE_DECODER
from postdiff.runtime.runners.base import Runner
from postdiff.runtime.runners.ort import OrtRunner
from postdiff.runtime.runners.weights import WeightPool
from postdiff.runtime.schedule import Schedule, plain_schedule
from postdiff.runtime.schedulers import make_scheduler
from postdiff.runtime.tokenizer import PromptTokenizer


@dataclass(frozen=True)
class GenerateOptions:
    """What to generate and how."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    scheduler: str = "ddim"
    sizes: SizeConditioning = SizeConditioning()  # SDXL's micro-conditioning (ignored by SD bundles)

    def validate(self) -> None:
        """Raise InputError for values no schedule can run."""
        if self.steps <= 0:
            raise InputError(f"--steps {self.steps} is not positive; use a step count of at least 1")
        if not np.isfinite(self.guidance):
            raise InputError(f"--guidance {self.guidance} is not a finite number")


@dataclass(frozen=True)
class Generation:
    """The result of one generation: final latents (1, C, h, w) and the image (H, W, C) uint8."""

    latents: np.ndarray
    image: np.ndarray


class Pipeline:
    """Loads a bundle's graphs once and generates images from prompts."""

    def __init__(self, bundle: Path, provider: str = "cpu", verify: bool = True,
                 shared_weights: bool | None = None, threads: int | None = None) -> None:
        """Load a bundle.

        Args:
            verify: check every file's sha256 first.
            shared_weights: give all UNet sessions one in-memory copy of the weights (default: when
                the bundle has more than one UNet graph).
            threads: intra-op threads per ONNX Runtime session (default: ONNX Runtime's choice).
        """
        self.bundle = Path(bundle)
        self.manifest: Manifest = load_manifest(self.bundle, verify=verify)
        self.provider = provider
        self.tokenizer = PromptTokenizer(self.manifest.tokenizer, self.bundle)
        unets = sum(1 for g in self.manifest.graphs.values() if g.variant is not None)
        share = unets > 1 if shared_weights is None else shared_weights
        self._pool = WeightPool(self.bundle, self.manifest) if share else None
        self._runners: dict[str, Runner] = {}
        self._executors: dict[Schedule, ScheduleExecutor] = {}
        self._threads = threads
        self._sdxl = SdxlPromptEncoder(self.manifest, self.bundle, self.runner) if self.manifest.sdxl else None

    def runner(self, name: str) -> Runner:
        """The runner of graph ``name``, created on first use."""
        if name not in self._runners:
            spec = self.manifest.graph(name)
            shared = self._pool.initializers(spec) if self._pool is not None else None
            self._runners[name] = OrtRunner(spec, self.bundle, self.provider, shared, self._threads)
        return self._runners[name]

    @property
    def weights_mode(self) -> str:
        """How the UNet sessions hold their weights: "shared" (one in-memory copy) or "per-session"."""
        return "shared" if self._pool is not None else "per-session"

    def executor(self, schedule: Schedule) -> ScheduleExecutor:
        """The executor of ``schedule`` on this bundle, made once per schedule (ScheduleError if the
        bundle lacks its graphs)."""
        if schedule not in self._executors:
            self._executors[schedule] = ScheduleExecutor(self.manifest, schedule, self.runner)
        return self._executors[schedule]

    def load_all(self) -> None:
        """Open a session for every graph now (benchmarks exclude this from their timings)."""
        for name in sorted(self.manifest.graphs):
            self.runner(name)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one full-resolution latent, (1, C, h, w)."""
        return (1, self.manifest.model.latent_channels, *self.manifest.model.latent)

    def encode_prompt(self, text: str) -> np.ndarray:
        """Text-encoder hidden states of ``text``: (1, L, D)."""
        spec = self.manifest.graph(TEXT_ENCODER).input(INPUT_IDS)
        ids = self.tokenizer.encode(text, dtype=spec.dtype)
        return self.runner(TEXT_ENCODER).infer({INPUT_IDS: ids})[HIDDEN_STATES]

    def initial_latents(self, seed: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Seeded standard-normal latents, reproducible across machines (numpy PCG64); full
        resolution unless ``shape`` says otherwise."""
        rng = np.random.default_rng(seed)
        return rng.standard_normal(shape or self.latent_shape, dtype=np.float32)

    def check_latents(self, latents: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Validate user-supplied initial latents against the expected shape."""
        shape = shape or self.latent_shape
        if latents.shape != shape:
            raise InputError(
                f"initial latents have shape {list(latents.shape)}, but this bundle and schedule expect "
                f"{list(shape)}; generate them for this resolution"
            )
        return latents.astype(np.float32, copy=False)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VAE-decode latents (1, C, h, w) to uint8 images (1, H, W, 3); pixel-space models (no
        decoder graph) are their own images (1, H, W, C)."""
        if VAE_DECODER not in self.manifest.graphs:
            return to_uint8(latents)
        decoder = self.runner(VAE_DECODER)
        latents = latents.astype(decoder.spec.input(LATENTS).dtype, copy=False)
        return to_uint8(decoder.infer({LATENTS: latents})[IMAGE].astype(np.float32, copy=False))

    def conditioning(self, options: GenerateOptions) -> Conditioning:
        """Everything the UNet is conditioned on, [negative; positive] (SDXL: both encoders, pooled
        embeddings and size ids; runtime/conditioning.py)."""
        if self._sdxl is not None:
            model = self.manifest.model
            return self._sdxl.pair(options.prompt, options.negative_prompt, options.guidance, options.sizes,
                                   (model.height, model.width))
        return Conditioning(self.encode_pair(options))

    def encode_pair(self, options: GenerateOptions) -> np.ndarray:
        """[negative; positive] encoder states (2, L, D); both rows carry the prompt when guidance is
        off, so that only the conditional half matters."""
        if self._sdxl is not None:
            return self.conditioning(options).context
        positive = self.encode_prompt(options.prompt)
        negative = self.encode_prompt(options.negative_prompt) if options.guidance > 1.0 else positive
        return np.concatenate([negative, positive])

    def generate(self, options: GenerateOptions, latents: np.ndarray | None = None, progress: bool = False,
                 schedule: Schedule | None = None) -> Generation:
        """Generate one image; ``latents`` overrides the seeded initial noise.

        Without ``schedule`` this is plain generation: ``options.steps`` full-resolution steps with
        guidance (:func:`~postdiff.runtime.schedule.plain_schedule`). With one, the schedule fixes the steps and every graph
        choice; all the graphs it needs are checked to exist before any compute.
        """
        options.validate()
        executor = self.executor(schedule if schedule is not None else plain_schedule(options.steps))
        shape = executor.first_latent_shape()
        latents = self.initial_latents(options.seed, shape) if latents is None else self.check_latents(latents, shape)
        scheduler = make_scheduler(options.scheduler, self.manifest.scheduler)
        final = executor.run(scheduler, latents, self.conditioning(options), options.guidance, options.seed, progress)
        return Generation(latents=final, image=self.decode(final)[0])
