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
from postdiff.runtime.executor import ScheduleExecutor
from postdiff.runtime.image import to_uint8
from postdiff.runtime.manifest import Manifest, load_manifest
from postdiff.runtime.names import HIDDEN_STATES, IMAGE, INPUT_IDS, LATENTS, TEXT_ENCODER, VAE_DECODER
from postdiff.runtime.runners.base import Runner
from postdiff.runtime.runners.providers import AUTO_PRECISION, get_provider
from postdiff.runtime.schedule import Schedule, plain_schedule
from postdiff.runtime.schedulers import Scheduler, default_scheduler, make_scheduler
from postdiff.runtime.tokenizer import PromptTokenizer


@dataclass(frozen=True)
class GenerateOptions:
    """What to generate and how."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    scheduler: str | None = None  # a key of SCHEDULERS; None: the sampler the model ships

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
                 shared_weights: bool | None = None, threads: int | None = None, precision: str = AUTO_PRECISION) -> None:
        """Load a bundle.

        Args:
            provider: a name from :mod:`~postdiff.runtime.runners.providers` (InputError otherwise).
            verify: check every file's sha256 first.
            shared_weights: give all UNet sessions one in-memory copy of the weights (default: when
                the bundle has more than one UNet graph). ONNX Runtime: one set of shared initializers;
                OpenVINO: all UNet graphs compiled as one model (:mod:`.runners.openvino_set`).
            threads: intra-op threads per session (default: the backend's choice).
            precision: inference precision: ``auto`` (the graphs' own under ONNX Runtime; the CPU's
                fastest under OpenVINO), ``fp32``, or ``bf16`` (OpenVINO, where the CPU has it).
        """
        self.bundle = Path(bundle)
        self.provider = provider
        self.backend = get_provider(provider).backend
        self.precision = precision
        if self.backend == "openvino":
            from postdiff.runtime.runners.openvino import resolve_precision

            self.precision = resolve_precision(precision)  # InputError before any file is read
        elif precision not in (AUTO_PRECISION, "fp32"):
            raise InputError(f"--precision {precision} needs --provider openvino; ONNX Runtime runs the graphs at "
                             "the precision they were exported with (postdiff export --precision)")
        self.manifest: Manifest = load_manifest(self.bundle, verify=verify)
        self.tokenizer = PromptTokenizer(self.manifest.tokenizer, self.bundle)
        unets = sum(1 for g in self.manifest.graphs.values() if g.variant is not None)
        share = unets > 1 if shared_weights is None else shared_weights
        self._share = share
        self._pool = None
        self._variant_set = None  # OpenVINO, shared weights: every UNet graph in one compiled model
        if share and self.backend == "onnxruntime":
            from postdiff.runtime.runners.weights import WeightPool

            self._pool = WeightPool(self.bundle, self.manifest)
        self._runners: dict[str, Runner] = {}
        self._executors: dict[Schedule, ScheduleExecutor] = {}
        self._threads = threads

    def runner(self, name: str) -> Runner:
        """The runner of graph ``name``, created on first use."""
        if name not in self._runners:
            spec = self.manifest.graph(name)
            if self.backend == "openvino" and self._share and spec.variant is not None:
                self._runners[name] = self._openvino_variants().runner(name)
            elif self.backend == "openvino":
                from postdiff.runtime.runners.openvino import OpenVinoRunner

                self._runners[name] = OpenVinoRunner(spec, self.bundle, self.precision, self._threads)
            else:
                from postdiff.runtime.runners.ort import OrtRunner

                shared = self._pool.initializers(spec) if self._pool is not None else None
                self._runners[name] = OrtRunner(spec, self.bundle, self.provider, shared, self._threads)
        return self._runners[name]

    def _openvino_variants(self):  # -> OpenVinoVariantSet
        """Every UNet graph of the bundle compiled as one OpenVINO model, built on first use."""
        if self._variant_set is None:
            from postdiff.runtime.runners.openvino_set import OpenVinoVariantSet

            names = sorted(n for n, g in self.manifest.graphs.items() if g.variant is not None)
            self._variant_set = OpenVinoVariantSet(self.bundle, self.manifest, names, self.precision, self._threads)
        return self._variant_set

    @property
    def precisions(self) -> dict[str, str]:
        """The precision each opened graph runs at, by graph name (as its backend reports it)."""
        return {name: runner.precision for name, runner in sorted(self._runners.items())}

    @property
    def weights_mode(self) -> str:
        """How the UNet sessions hold their weights: "shared" (one in-memory copy) or "per-session"."""
        return "shared" if self._share else "per-session"

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

    def encode_pair(self, options: GenerateOptions) -> np.ndarray:
        """[negative; positive] encoder states (2, L, D); both rows carry the prompt when guidance is
        off, so that only the conditional half matters."""
        positive = self.encode_prompt(options.prompt)
        negative = self.encode_prompt(options.negative_prompt) if options.guidance > 1.0 else positive
        return np.concatenate([negative, positive])

    @property
    def default_scheduler(self) -> str:
        """The sampler the bundle's model ships (InputError listing the supported ones if unported)."""
        return default_scheduler(self.manifest.scheduler_class)

    def scheduler(self, options: GenerateOptions) -> Scheduler:
        """A fresh ``options.scheduler`` (default: the shipped one) from the manifest's config,
        seeded by ``options.seed`` (the stochastic samplers' noise)."""
        name = options.scheduler if options.scheduler is not None else self.default_scheduler
        return make_scheduler(name, self.manifest.scheduler, seed=options.seed)

    def generate(self, options: GenerateOptions, latents: np.ndarray | None = None, progress: bool = False,
                 schedule: Schedule | None = None) -> Generation:
        """Generate one image; ``latents`` overrides the seeded initial noise.

        Without ``schedule`` this is plain generation: ``options.steps`` full-resolution steps with
        guidance (:func:`~postdiff.runtime.schedule.plain_schedule`). With one, the schedule fixes the steps and every graph
        choice; all the graphs it needs are checked to exist before any compute.
        """
        options.validate()
        scheduler = self.scheduler(options)
        if schedule is None:
            # As diffusers' pipeline: ``steps`` inference steps, one model call per timestep they give.
            scheduler.set_timesteps(options.steps)
            schedule = plain_schedule(len(scheduler.timesteps), cfg=not self.manifest.model.guidance_embedding)
        executor = self.executor(schedule)
        shape = executor.first_latent_shape()
        latents = self.initial_latents(options.seed, shape) if latents is None else self.check_latents(latents, shape)
        final = executor.run(scheduler, latents, self.encode_pair(options), options.guidance, options.seed, progress)
        return Generation(latents=final, image=self.decode(final)[0])
