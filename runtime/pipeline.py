"""Text-to-image generation from a bundle, torch-free: tokenize, encode, denoise, decode.

Plain generation is a schedule too (:func:`~postdiff.runtime.schedule.plain_schedule`), run by the same executor as every
other: its loop mirrors diffusers' ``StableDiffusionPipeline`` step for step (same guidance formula,
same order of scheduler calls), so that with the same initial latents the results agree to float
rounding. Shapes and dtypes come from the manifest; roles and tensor names from ``names``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from postdiff.errors import InputError, ScheduleError
from postdiff.runtime.conditioning import Conditioning, SdxlPromptEncoder, SizeConditioning
from postdiff.runtime.executor import ScheduleExecutor, concrete, resolve_graphs
from postdiff.runtime.image import to_uint8
from postdiff.runtime.manifest import Manifest, load_manifest
from postdiff.runtime.memory import Phase, PhaseEstimate, check_budget, estimate, step_phases
from postdiff.runtime.names import (ATTENTION_MASK, HIDDEN_STATES, IMAGE, INPUT_IDS, LATENTS, TEXT_ENCODER, TEXT_ENCODERS, UNET,
                                    VAE_DECODER)
from postdiff.runtime.runners.base import Runner
from postdiff.runtime.runners.providers import AUTO_PRECISION, get_provider
from postdiff.runtime.schedule import PLAIN_UNGUIDED, Schedule, plain_schedule
from postdiff.runtime.schedulers import Scheduler, default_scheduler, make_scheduler
from postdiff.runtime.stamp import verify_bundle
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
    sizes: SizeConditioning = SizeConditioning()  # SDXL's micro-conditioning (ignored by SD bundles)

    def validate(self) -> None:
        """Raise InputError for values no schedule can run."""
        if self.steps <= 0:
            raise InputError(f"--steps {self.steps} is not positive; use a step count of at least 1")
        if not np.isfinite(self.guidance):
            raise InputError(f"--guidance {self.guidance} is not a finite number")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise InputError(f"seed {self.seed!r} is not a whole number >= 0; use e.g. --seed 0")
        check_text(self.prompt, "prompt")
        check_text(self.negative_prompt, "negative prompt")


def check_text(text: str, what: str) -> None:
    """InputError unless ``text`` is a string of valid Unicode (no lone surrogates, which a shell
    passes for bytes that are not UTF-8)."""
    if not isinstance(text, str):
        raise InputError(f"{what} {text!r} is not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} {text!r} is not valid Unicode (character {exc.start} is a lone surrogate: "
                         "bytes that are not UTF-8); pass the prompt as UTF-8 text") from None


@dataclass(frozen=True)
class Generation:
    """The result of one generation: final latents (1, C, h, w) and the image (H, W, C) uint8."""

    latents: np.ndarray
    image: np.ndarray


class Pipeline:
    """Loads a bundle once and generates images from prompts: the runtime's Python API.

    Sessions open on first use and, without a memory budget, stay open for the next image. With
    ``memory_budget_mb`` only the graphs of the current phase are open (see
    :mod:`postdiff.runtime.memory`) and a generation whose largest phase cannot fit is refused before
    any compute. ``timings`` records the cold-start figures: ``verify_s`` (manifest + stamp check),
    ``sessions_s`` (session creation, summed), ``load_s`` (process start to the first UNet call).
    """

    def __init__(self, bundle: Path, provider: str = "cpu", verify: bool = True,
                 shared_weights: bool | None = None, threads: int | None = None,
                 memory_budget_mb: float | None = None, precision: str = AUTO_PRECISION,
                 unet: str = "auto", iobinding: bool | None = None) -> None:
        """Load a bundle.

        Args:
            provider: a name from :mod:`~postdiff.runtime.runners.providers` (InputError otherwise).
            verify: check every file against its sha256, hashing only what the bundle's stamp does
                not vouch for (:mod:`postdiff.runtime.stamp`); False skips the check.
            shared_weights: give all UNet sessions one in-memory copy of the weights (default: when
                the bundle has more than one UNet graph). ONNX Runtime: one set of shared initializers;
                OpenVINO: all UNet graphs compiled as one model (:mod:`.runners.openvino_set`).
            threads: intra-op threads per session (default: the backend's choice).
            memory_budget_mb: open only the current phase's graphs and refuse a generation whose
                largest phase is estimated above this many MB.
            precision: inference precision: ``auto`` (the graphs' own under ONNX Runtime; the CPU's
                fastest under OpenVINO), ``fp32``, or ``bf16`` (OpenVINO, where the CPU has it).
            unet: which form of the UNet to run, per-variant graphs or the merged graph
                (``executor.resolve_graphs``; default auto: per-variant where present; ``tensorrt``: the
                merged engine when `postdiff compile` built one).
            iobinding: ONNX Runtime through IOBinding, caches kept on the provider's device between
                steps (:mod:`.runners.ort`); None: on for GPU providers (``cuda``), off on the CPU.
        """
        started = time.perf_counter()
        self.bundle = Path(bundle)
        self.backend = get_provider(provider).backend
        self.precision = precision
        if self.backend == "openvino":
            from postdiff.runtime.runners.openvino import resolve_precision

            self.precision = resolve_precision(precision)  # InputError before any file is read
        elif precision not in (AUTO_PRECISION, "fp32"):
            raise InputError(f"--precision {precision} needs --provider openvino; ONNX Runtime runs the graphs at "
                             "the precision they were exported with (postdiff export --precision)")
        self.manifest: Manifest = load_manifest(self.bundle, verify=False)
        if verify:
            verify_bundle(self.bundle, self.manifest)
        self.provider = provider
        self.iobinding = iobinding
        self.tokenizer = PromptTokenizer(self.manifest.tokenizer, self.bundle)
        self.timings: dict[str, float] = {"verify_s": time.perf_counter() - started, "sessions_s": 0.0}
        self._precisions: dict[str, str] = {}
        unets = sum(1 for g in self.manifest.graphs.values() if g.role == UNET)
        share = unets > 1 if shared_weights is None else shared_weights
        self._share = share
        self._pool = None
        self._variant_sets: dict = {}  # OpenVINO, shared weights: precision -> every UNet graph in one compiled model
        if share and self.backend == "onnxruntime":
            from postdiff.runtime.runners.weights import WeightPool

            self._pool = WeightPool(self.bundle, self.manifest)
        self._runners: dict[str, Runner] = {}
        self._executors: dict[Schedule, ScheduleExecutor] = {}
        self._checked: set[Schedule] = set()
        self._threads = threads
        if memory_budget_mb is not None and not memory_budget_mb > 0:
            raise InputError(f"--memory-budget {memory_budget_mb} is not a positive number of MB")
        self.memory_budget_mb = memory_budget_mb
        self._sdxl = SdxlPromptEncoder(self.manifest, self.bundle, self.runner) if self.manifest.sdxl else None
        self._engines = None
        if self.backend == "tensorrt":  # our runner: engines from `postdiff compile`, the UNet merged when compiled so
            from postdiff.runtime.engines import load_engines

            self._engines = load_engines(self.bundle, self.manifest)
            merged = self.manifest.merged_unet
            if unet == "auto":
                unet = "merged" if merged is not None and self._engines.engine_for(merged) else "variants"
        if self.backend == "openvino" and unet == "merged":
            raise InputError("--unet merged is refused with --provider openvino: OpenVINO 2026.4 computes a wrong "
                             "noise_pred (off by up to 1e30) on the first call of some branches of the merged graph "
                             "(docs/openvino.md); use the per-variant graphs (--unet auto), which OpenVINO shares "
                             "weights between as one compiled model")
        self.unet = unet

    def runner(self, name: str, precision: str | None = None) -> Runner:
        """The runner of graph ``name``, opened on first use (or again after a release).

        ``precision`` (a schedule step's ``fp32``/``bf16``; None or ``auto``: the pipeline's) opens the
        graph compiled at that precision, beside any other precision of it already open (OpenVINO only;
        :meth:`check_precisions` refuses it on the other backends before any compute)."""
        wanted = self._precision_of(precision)
        key = name if wanted == self.precision else f"{name}@{wanted}"
        if key not in self._runners:
            spec = self.manifest.graph(name)
            started = time.perf_counter()
            if self._engines is not None:
                from postdiff.runtime.runners.tensorrt import TensorRTRunner

                self._runners[key] = TensorRTRunner(spec, self.bundle, self._engines, name)
            elif self.backend == "openvino" and self._share and spec.variant is not None:
                self._runners[key] = self._openvino_variants(wanted).runner(name)
            elif self.backend == "openvino":
                from postdiff.runtime.runners.openvino import OpenVinoRunner

                self._runners[key] = OpenVinoRunner(spec, self.bundle, wanted, self._threads)
            else:
                from postdiff.runtime.runners.ort import OrtRunner

                shared = self._pool.initializers(spec) if self._pool is not None else None
                self._runners[key] = OrtRunner(spec, self.bundle, self.provider, shared, self._threads,
                                               prepack=name not in TEXT_ENCODERS, arena=self.memory_budget_mb is None,
                                               iobinding=self.iobinding)
            self.timings["sessions_s"] += time.perf_counter() - started
            self._precisions[key] = self._runners[key].precision
        return self._runners[key]

    def _precision_of(self, precision: str | None) -> str:
        """The precision a request for ``precision`` runs at (None and ``auto``: the pipeline's)."""
        if precision is None or precision == AUTO_PRECISION or precision == self.precision:
            return self.precision
        if self.backend == "onnxruntime" and precision == "fp32":
            return self.precision  # the graphs as exported, fp32 (check_precisions)
        if self.backend != "openvino":
            raise InputError(f"a schedule step asks for precision {precision}, which only --provider openvino "
                             f"switches per step; {self.provider} runs every graph at the precision it was "
                             "exported with: use --provider openvino, or a schedule without per-step precisions")
        from postdiff.runtime.runners.openvino import resolve_precision

        return resolve_precision(precision)

    def check_precisions(self, schedule: Schedule) -> None:
        """InputError, before any compute, when ``schedule`` pins a step precision this backend or CPU
        cannot run: ``bf16`` needs OpenVINO on a CPU with native bfloat16; ``fp32`` runs anywhere the
        graphs are fp32 (ONNX Runtime runs them as exported)."""
        for precision in schedule.precisions:
            if precision == AUTO_PRECISION:
                continue
            if self.backend == "openvino":
                self._precision_of(precision)
            elif precision != "fp32" or self.backend == "tensorrt":
                self._precision_of(precision)  # InputError naming the fix
            elif any(g.precision != "fp32" for g in self.manifest.graphs.values() if g.role == UNET):
                raise InputError(f"schedule '{schedule.name}' pins steps to fp32, but this bundle's UNet graphs are "
                                 f"{sorted({g.precision for g in self.manifest.graphs.values() if g.role == UNET})} "
                                 "and ONNX Runtime runs them as exported; re-export with --precision fp32 or use "
                                 "--provider openvino")

    def _openvino_variants(self, precision: str):  # -> OpenVinoVariantSet
        """Every UNet graph of the bundle compiled as one OpenVINO model at ``precision``, built on first use
        (one such model per precision a schedule asks for)."""
        if precision not in self._variant_sets:
            from postdiff.runtime.runners.openvino_set import OpenVinoVariantSet

            names = sorted(n for n, g in self.manifest.graphs.items() if g.variant is not None)
            self._variant_sets[precision] = OpenVinoVariantSet(self.bundle, self.manifest, names, precision,
                                                               self._threads)
        return self._variant_sets[precision]

    @property
    def precisions(self) -> dict[str, str]:
        """The precision each graph opened so far ran at, by graph name (as its backend reports it),
        released graphs included."""
        return dict(sorted(self._precisions.items()))

    def release(self, name: str) -> None:
        """Close graph ``name``'s session (at every precision open) and drop the shared weights no open
        graph holds."""
        keys = [key for key in self._runners if key == name or key.startswith(f"{name}@")]
        for key in keys:
            del self._runners[key]
        if keys and self._pool is not None:
            self._pool.release(self.manifest.graph(name))

    @property
    def open_graphs(self) -> list[str]:
        """Names of the graphs with an open session."""
        return sorted(self._runners)

    @property
    def weights_mode(self) -> str:
        """How the UNet sessions hold their weights: "shared" (one in-memory copy) or "per-session"."""
        return "shared" if self._share else "per-session"

    def executor(self, schedule: Schedule) -> ScheduleExecutor:
        """The executor of ``schedule`` on this bundle, made once per schedule (ScheduleError if the
        bundle lacks its graphs)."""
        if schedule not in self._executors:
            self.check_precisions(schedule)
            release = self.release if self.memory_budget_mb is not None else None
            self._executors[schedule] = ScheduleExecutor(self.manifest, schedule, self.runner, release, self.unet)
        return self._executors[schedule]

    def load_all(self) -> None:
        """Open a session for every graph of the UNet form in use now (benchmarks exclude this from their
        timings)."""
        merged = self.manifest.merged_unet
        for name, spec in sorted(self.manifest.graphs.items()):
            in_use = (name == merged) == (self.unet == "merged") if spec.role == UNET else True
            if in_use:
                self.runner(name)

    def _plain_cfg(self, guidance: float) -> bool:
        """Whether plain generation runs the guided batch-2 graph: not for models that embed the
        guidance scale (LCM), nor with guidance off (<= 1), which runs batch 1 as diffusers does --
        where the bundle has that graph (older bundles: batch 2, half unused)."""
        if self.manifest.model.guidance_embedding:
            return False
        return guidance > 1.0 or concrete(self.manifest, PLAIN_UNGUIDED) not in self.manifest.unet_graphs

    def plan_for(self, options: GenerateOptions) -> Schedule:
        """Plain generation's schedule for ``options``: as diffusers' pipeline, ``options.steps``
        inference steps of the sampler and one model call per timestep they give (PNDM: one more)."""
        probe = self.scheduler(options)
        probe.set_timesteps(options.steps)
        return plain_schedule(len(probe.timesteps), cfg=self._plain_cfg(options.guidance))

    def default_schedule(self, guidance: float) -> str | None:
        """What ``generate`` runs without a schedule: None (plain generation) when the bundle has the
        plain graph, else the name of the first schedule the bundle was exported for.

        Raises:
            ScheduleError: neither exists (naming the missing graph and what to do).
        """
        plain = plain_schedule(1, cfg=self._plain_cfg(guidance))
        try:
            resolve_graphs(self.manifest, plain)
        except ScheduleError:
            if self.manifest.schedules:
                return self.manifest.schedules[0]
            raise
        return None

    def phases(self, schedule: Schedule) -> list[Phase]:
        """The phases of one generation of ``schedule`` under a memory budget, in order."""
        encoders = tuple(name for name in TEXT_ENCODERS if name in self.manifest.graphs)
        phases = [Phase("encode", encoders)] if encoders else []
        phases += step_phases(self.executor(schedule).phases())
        if VAE_DECODER in self.manifest.graphs:
            phases.append(Phase("decode", (VAE_DECODER,)))
        return phases

    def memory_estimate(self, schedule: Schedule) -> list[PhaseEstimate]:
        """Estimated memory of each phase of ``schedule`` (:mod:`postdiff.runtime.memory`)."""
        return estimate(self.manifest, self.bundle, self.phases(schedule), shared=self._pool is not None)

    def check_memory(self, schedule: Schedule) -> None:
        """Under a memory budget: InputError, before any compute, if ``schedule``'s largest phase
        cannot fit (checked once per schedule)."""
        if self.memory_budget_mb is not None and schedule not in self._checked:
            check_budget(self.memory_estimate(schedule), self.memory_budget_mb)
            self._checked.add(schedule)

    @property
    def default_scheduler(self) -> str:
        """The sampler the bundle's model ships (InputError listing the supported ones if unported)."""
        return default_scheduler(self.manifest.scheduler_class)

    def scheduler(self, options: GenerateOptions) -> Scheduler:
        """A fresh ``options.scheduler`` (default: the shipped one) from the manifest's config,
        seeded by ``options.seed`` (the stochastic samplers' noise)."""
        name = options.scheduler if options.scheduler is not None else self.default_scheduler
        return make_scheduler(name, self.manifest.scheduler, seed=options.seed)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one full-resolution latent, (1, C, h, w)."""
        return (1, self.manifest.model.latent_channels, *self.manifest.model.latent)

    def encode_prompt(self, text: str) -> np.ndarray:
        """Text-encoder hidden states of ``text``: (1, L, D)."""
        ids = self.token_ids(text)
        return self.runner(TEXT_ENCODER).infer({INPUT_IDS: ids})[HIDDEN_STATES].copy()  # kept across the next call

    def token_ids(self, text: str) -> np.ndarray:
        """The text encoder's id row of ``text`` (InputError for text the tokenizer cannot take)."""
        check_text(text, "prompt")
        return self.tokenizer.encode(text, dtype=self.manifest.graph(TEXT_ENCODER).input(INPUT_IDS).dtype)

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
        image = to_uint8(decoder.infer({LATENTS: latents})[IMAGE].astype(np.float32, copy=False))
        if self.memory_budget_mb is not None:
            self.release(VAE_DECODER)
        return image

    def conditioning(self, options: GenerateOptions) -> Conditioning:
        """Everything the UNet is conditioned on, [negative; positive] (SDXL: both encoders, pooled
        embeddings and size ids; runtime/conditioning.py)."""
        if self._sdxl is not None:
            model = self.manifest.model
            pair = self._sdxl.pair(options.prompt, options.negative_prompt, options.guidance, options.sizes,
                                   (model.height, model.width))
            self._release_encoders()
            return pair
        if self.manifest.pixart is not None:
            return self._pixart_pair(options)
        return Conditioning(self.encode_pair(options))

    def _pixart_pair(self, options: GenerateOptions) -> Conditioning:
        """PixArt-alpha: [negative; positive] T5 states under their masks, as ``PixArtAlphaPipeline.encode_prompt``
        (the negative prompt, "" by default, is encoded like the prompt; guidance off: both rows the prompt's)."""
        encoder = self.runner(TEXT_ENCODER)
        dtype = encoder.spec.input(INPUT_IDS).dtype
        rows, masks = [], []
        texts = (options.negative_prompt, options.prompt) if options.guidance > 1.0 else (options.prompt,)
        for text in texts:
            check_text(text, "prompt")
            ids, mask = self.tokenizer.encode_with_mask(text, dtype=dtype)
            states = encoder.infer({INPUT_IDS: ids, ATTENTION_MASK: mask.astype(encoder.spec.input(ATTENTION_MASK)
                                                                                   .dtype)})[HIDDEN_STATES]
            rows.append(states.astype(np.float32))  # a copy: kept across the next call
            masks.append(mask.astype(np.int64))
        if len(rows) == 1:
            rows, masks = rows * 2, masks * 2
        self._release_encoders()
        return Conditioning(np.concatenate(rows), mask=np.concatenate(masks))

    def encode_pair(self, options: GenerateOptions) -> np.ndarray:
        """[negative; positive] encoder states (2, L, D); both rows carry the prompt when guidance is
        off, so that only the conditional half matters."""
        if self._sdxl is not None or self.manifest.pixart is not None:
            return self.conditioning(options).context
        positive = self.encode_prompt(options.prompt)
        negative = self.encode_prompt(options.negative_prompt) if options.guidance > 1.0 else positive
        self._release_encoders()
        return np.concatenate([negative, positive])

    def _release_encoders(self) -> None:
        """Under a memory budget: close the text encoders once the prompts are encoded."""
        if self.memory_budget_mb is not None:
            for name in TEXT_ENCODERS:
                self.release(name)

    def generate(self, options: GenerateOptions, latents: np.ndarray | None = None, progress: bool = False,
                 schedule: Schedule | None = None, on_step: Callable[[], None] | None = None) -> Generation:
        """Generate one image; ``latents`` overrides the seeded initial noise.

        Without ``schedule`` this is plain generation (:meth:`plan_for`: full resolution, guided, or
        batch 1 with guidance off or embedded). With one, the schedule fixes the
        steps and every graph choice. All the graphs it needs are checked to exist, and under a
        memory budget the largest phase to fit, before any compute. ``progress`` shows a bar over the
        steps; ``on_step`` is called after each step instead (one bar over many images).
        """
        options.validate()
        plan = schedule if schedule is not None else self.plan_for(options)
        executor = self.executor(plan)
        self.check_memory(plan)
        shape = executor.first_latent_shape()
        latents = self.initial_latents(options.seed, shape) if latents is None else self.check_latents(latents, shape)
        for text in (options.prompt, options.negative_prompt):  # a prompt the tokenizer refuses: before compute
            self.token_ids(text)
        scheduler = self.scheduler(options)
        conditioning = self.conditioning(options)
        bar = tqdm(total=len(plan.steps), desc=plan.name, disable=not progress or on_step is not None, leave=False)
        with bar:
            final = executor.run(scheduler, latents, conditioning, options.guidance, options.seed,
                                 on_step=on_step or bar.update)
        if "load_s" not in self.timings and executor.first_call_age_s is not None:
            self.timings["load_s"] = executor.first_call_age_s
        return Generation(latents=final, image=self.decode(final)[0])
