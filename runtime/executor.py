"""Executing a static schedule: the runtime half of PostDiff.

The executor walks :func:`~postdiff.runtime.schedule.plan_steps` and, per step, picks the UNet graph
the plan names, feeds it, keeps the cache tensors it emits (the DeepCache feature, the
cross-attention maps) until a later graph takes them, and advances the scheduler. What it keeps it
keeps as ``value.copy()``: a runner owns its outputs and may reuse their buffers on its next call
(the contract in :mod:`~postdiff.runtime.runners.base`); a device runner's caches stay on its
device (numpy arrays on the host, device arrays elsewhere).
It decides nothing: every choice was made when the schedule was built.

A bundle may hold its UNet in two forms (see the manifest): one graph per variant, and the merged
graph whose ``If`` branches compute every variant over one set of weights (``export --merged``).
:func:`resolve_graphs` picks, per variant, the form the caller asks for; a variant run through the
merged graph is a :class:`~postdiff.runtime.runners.branch.BranchRunner`, which looks to the loop below
exactly like the per-variant graph's runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from postdiff.errors import InputError, ScheduleError
from postdiff.runtime.clock import process_age_s
from postdiff.runtime.conditioning import Conditioning
from postdiff.runtime.guidance import guidance_embedding
from postdiff.runtime.manifest import Manifest, ServedVariant, UNetVariant, describe_variant
from postdiff.runtime.names import (CONTEXT, DEEP_FEATURE, ENCODER_MASK, NOISE_PRED, SAMPLE, TEXT_EMBEDS, TIME_IDS, TIMESTEP,
                                    TIMESTEP_COND, XATTN_PREFIX)
from postdiff.runtime.resize import resize_bilinear
from postdiff.runtime.runners.base import Runner
from postdiff.runtime.runners.branch import BranchRunner
from postdiff.runtime.schedule import (AUTO_PRECISION, Schedule, StepPlan, Variant, graph_variants, latent_size,
                                       plan_steps)
from postdiff.runtime.schedulers.base import Scheduler


def at_latent(variant: Variant, full: tuple[int, int], multiple: int) -> UNetVariant:
    """The manifest-level variant of a schedule-level one, for a full latent size ``full`` whose
    scaled sides must be multiples of ``multiple`` (ScheduleError otherwise)."""
    return UNetVariant(latent=latent_size(full, variant.scale, multiple), batch=variant.batch, deep=variant.deep,
                       branch=variant.branch, xattn=variant.xattn)


def concrete(manifest: Manifest, variant: Variant) -> UNetVariant:
    """The manifest-level variant of a schedule-level one, at this bundle's latent size."""
    return at_latent(variant, manifest.model.latent, manifest.model.downsample_factor)


UNET_FORMS = ("auto", "variants", "merged")


@dataclass(frozen=True)
class GraphRef:
    """Where one variant is computed: graph ``name``, and, for the merged graph, how (``served``)."""

    name: str
    served: ServedVariant | None = None


def resolve_graphs(manifest: Manifest, schedule: Schedule, unet: str = "auto") -> dict[Variant, GraphRef]:
    """The UNet graph of every variant ``schedule`` evaluates on this bundle, in first-use order,
    checked before any compute.

    Args:
        unet: ``"variants"``: the per-variant graphs; ``"merged"``: the merged graph; ``"auto"``: the
            per-variant graph where the bundle has one (the faster form on ONNX Runtime CPU, see
            docs/tensorrt.md), else the merged graph.

    Raises:
        InputError: an unknown ``unet`` form.
        ScheduleError: a scale off the bundle's grid or a variant the bundle was not exported with.
    """
    if unet not in UNET_FORMS:
        raise InputError(f"UNet form '{unet}' is not one of {list(UNET_FORMS)}")
    found: dict[Variant, GraphRef] = {}
    missing = []
    for variant in graph_variants(schedule):
        wanted = concrete(manifest, variant)
        served = manifest.served(wanted)
        if unet != "merged" and wanted in manifest.unet_graphs:
            found[variant] = GraphRef(manifest.unet_graphs[wanted])
        elif unet != "variants" and served is not None:
            found[variant] = GraphRef(manifest.merged_unet, served)
        else:
            missing.append(wanted)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ScheduleError(
            f"schedule '{schedule.name}' needs the {describe_variant(missing[0])}{more}, which this bundle lacks"
            f"{' (in its merged graph too)' if unet != 'variants' and manifest.merged_unet else ''}; "
            f"{manifest.export_hint()}"
            f"{' with --merged' if unet == 'merged' else ''}"
        )
    return found


def required_graphs(manifest: Manifest, schedule: Schedule, unet: str = "auto") -> list[str]:
    """Names of the UNet graphs ``schedule`` runs on this bundle, in first-use order (ScheduleError as
    :func:`resolve_graphs`)."""
    return list(dict.fromkeys(ref.name for ref in resolve_graphs(manifest, schedule, unet).values()))


def switch_noise(seed: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
    """The fresh Gaussian noise of the resolution switch at ``step``: seeded, so runs reproduce."""
    return np.random.default_rng([seed, 1, step]).standard_normal(shape, dtype=np.float32)


@dataclass(frozen=True)
class _Graph:
    """What feeding one variant's graph needs, looked up once (not on every step)."""

    runner: Runner
    sample_dtype: np.dtype
    timestep_dtype: np.dtype
    context_dtype: np.dtype | None  # None: the graph takes no context (its attn2 outputs are replayed)
    xattn_inputs: tuple[str, ...]
    cond_dtype: np.dtype | None = None  # the guidance embedding's, for UNets that take one (LCM)
    added_dtypes: tuple[np.dtype, np.dtype] | None = None  # SDXL: (text_embeds, time_ids) dtypes
    mask_dtype: np.dtype | None = None  # PixArt-alpha: the T5 attention mask the transformer cross-attends under


class ScheduleExecutor:
    """Runs one schedule with a given scheduler over a bundle's UNet graphs."""

    def __init__(self, manifest: Manifest, schedule: Schedule, runner: Callable[[str], Runner],
                 release: Callable[[str], None] | None = None, unet: str = "auto") -> None:
        """Args:
            runner: the runner of a graph by name (opened on first use); for a step that pins its
                precision (``Step.precision`` not ``auto``) it is called as ``runner(name, precision)``.
            release: when given, called with each graph's name right after its last use in a run
                (memory budgets: the low-resolution graphs after the switch, the guided ones after
                the gate); the graph is then opened again by the next run.
            unet: the UNet form, per-variant graphs or the merged graph (:func:`resolve_graphs`).
        """
        self.manifest = manifest
        self.schedule = schedule
        if manifest.model.guidance_embedding and any(step.cfg for step in schedule.steps):
            raise ScheduleError(
                f"schedule '{schedule.name}' runs classifier-free guidance, but this bundle's model takes the "
                "guidance scale as an embedding (LCM) and runs one conditional evaluation per step; use a "
                "schedule built with guidance off on every step (`postdiff schedule --guidance-embedding`, "
                "or a preset such as lcm-4 / postdiff-lcm)"
            )
        self._plans = plan_steps(schedule)
        self._graph_of = resolve_graphs(manifest, schedule, unet)  # ScheduleError before any compute
        self.graph_names = list(dict.fromkeys(ref.name for ref in self._graph_of.values()))
        self._runner = runner
        self._release = release
        self._graphs: dict[Variant, _Graph] = {}
        self._feature: np.ndarray | None = None
        self._xattn: dict[str, np.ndarray] = {}
        self._contexts: dict[tuple[int, np.dtype], np.ndarray] = {}
        self._added: dict[tuple[int, tuple[int, int]], dict[str, np.ndarray]] = {}
        self.first_call_age_s: float | None = None  # process age at this executor's first UNet call

    def phases(self) -> list[list[str]]:
        """The graphs open at each step when every graph is released after its last use: per step
        the names whose first use is at or before it and whose last use is at or after it."""
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for index, plan in enumerate(self._plans):
            for variant in filter(None, (plan.switch_from, plan.variant)):
                name = self._graph_of[variant].name
                first.setdefault(name, index)
                last[name] = index
        return [[n for n in self.graph_names if first[n] <= i <= last[n]] for i in range(len(self._plans))]

    def _last_uses(self) -> dict[int, list[str]]:
        """Step index -> the graphs used for the last time at that step."""
        last: dict[str, int] = {}
        for index, plan in enumerate(self._plans):
            for variant in filter(None, (plan.switch_from, plan.variant)):
                last[self._graph_of[variant].name] = index
        by_step: dict[int, list[str]] = {}
        for name, index in last.items():
            by_step.setdefault(index, []).append(name)
        return by_step

    @property
    def variants(self) -> list[Variant]:
        """The UNet variants this schedule evaluates, in first-use order."""
        return list(self._graph_of)

    def runner_for(self, variant: Variant) -> Runner:
        """The runner computing ``variant`` as this executor runs it (opened on first use)."""
        return self._graph(variant).runner

    def first_latent_shape(self) -> tuple[int, ...]:
        """Shape of the initial noise: the first step's latent size."""
        h, w = concrete(self.manifest, self._plans[0].variant).latent
        return (1, self.manifest.model.latent_channels, h, w)

    def run(self, scheduler: Scheduler, latents: np.ndarray, context: np.ndarray | Conditioning, guidance: float,
            seed: int, on_step: Callable[[], None] | None = None) -> np.ndarray:
        """Denoise ``latents`` (initial noise at the first step's size, unscaled) and return the
        final full-resolution latents.

        Args:
            scheduler: a fresh scheduler; its timesteps are set here, one per step of the schedule.
            context: [negative; positive] encoder states (2, L, D), or the whole
                :class:`~postdiff.runtime.conditioning.Conditioning` (SDXL bundles need it).
            guidance: classifier-free guidance scale for the steps with ``cfg`` on (<= 1: off, the
                conditional prediction alone).
            seed: seeds the re-noising at resolution switches.
            on_step: called after every step (progress bars).

        Raises:
            ScheduleError: the scheduler's configuration yields another number of timesteps than
                the schedule has steps.
        """
        # One timestep per step; a sampler that revisits a timestep (PNDM) needs fewer inference steps.
        scheduler.set_timesteps(scheduler.num_inference_steps_for(len(self._plans)))
        timesteps = scheduler.timesteps
        if len(timesteps) != len(self._plans):
            raise ScheduleError(
                f"the {type(scheduler).__name__} configured by this bundle gives {len(timesteps)} timesteps for "
                f"the {len(self._plans)} steps of schedule '{self.schedule.name}' (its configuration drops "
                "some, e.g. lambda_min_clipped); use another scheduler or fewer steps"
            )
        self._feature, self._xattn, self._contexts, self._added = None, {}, {}, {}
        if not isinstance(context, Conditioning):
            context = Conditioning(context)
        dim = self.manifest.model.guidance_embedding
        self._cond = guidance_embedding(guidance, dim) if dim else None
        releases = self._last_uses() if self._release is not None else {}
        x = latents * np.float32(scheduler.init_noise_sigma)
        for plan, t in zip(self._plans, timesteps):
            if plan.switch_from is not None:
                x = self._switch(plan, scheduler, x, t, context, guidance, seed)
            noise = self._evaluate(plan.variant, scheduler, x, t, context, guidance)
            x = scheduler.step(noise, t, x)
            for name in releases.get(plan.index, ()):
                self._close(name)
            if on_step is not None:
                on_step()
        return x

    def _close(self, name: str) -> None:
        """Forget graph ``name``'s feed description and hand it to ``release``."""
        self._graphs = {v: g for v, g in self._graphs.items() if self._graph_of[v].name != name}
        self._release(name)

    def _switch(self, plan: StepPlan, scheduler: Scheduler, x: np.ndarray, t: np.generic, context: Conditioning,
                guidance: float, seed: int) -> np.ndarray:
        """Resolution switch (DESIGN §1): x̂0 from the old resolution at t, bilinear upsample,
        re-noise to the same t with fresh seeded noise, and restart the solver's history."""
        noise = self._evaluate(plan.switch_from, scheduler, x, t, context, guidance)
        x0 = scheduler.predict_x0(noise, t, x)
        h, w = concrete(self.manifest, plan.variant).latent
        up = resize_bilinear(x0, h, w)
        scheduler.reset()
        self._feature = None  # spatial caches are stale at the new size
        return scheduler.add_noise(up, switch_noise(seed, plan.index, up.shape), t)

    def _graph(self, variant: Variant) -> _Graph:
        """The graph of ``variant`` and its feed dtypes; its session is opened on first use."""
        if variant not in self._graphs:
            ref = self._graph_of[variant]
            runner = (self._runner(ref.name) if variant.precision == AUTO_PRECISION
                      else self._runner(ref.name, variant.precision))
            if ref.served is not None:
                runner = BranchRunner(runner, ref.served)
            inputs = {t.name: np.dtype(t.dtype) for t in runner.spec.inputs}
            added = (inputs[TEXT_EMBEDS], inputs[TIME_IDS]) if TIME_IDS in inputs else None
            self._graphs[variant] = _Graph(runner, inputs[SAMPLE], inputs[TIMESTEP], inputs.get(CONTEXT),
                                           tuple(n for n in inputs if n.startswith(XATTN_PREFIX)),
                                           cond_dtype=inputs.get(TIMESTEP_COND), added_dtypes=added,
                                           mask_dtype=inputs.get(ENCODER_MASK))
        return self._graphs[variant]

    def _context(self, context: Conditioning, batch: int, dtype: np.dtype) -> np.ndarray:
        """The context rows a batch-``batch`` graph takes, cast once per run (not on every step)."""
        key = (batch, dtype)
        if key not in self._contexts:
            self._contexts[key] = context.rows(batch).context.astype(dtype, copy=False)
        return self._contexts[key]

    def _mask(self, context: Conditioning, batch: int, dtype: np.dtype) -> np.ndarray:
        """The encoder-mask rows a batch-``batch`` graph takes (PixArt-alpha), cast once per run."""
        key = ("mask", batch, dtype)
        if key not in self._contexts:
            rows = context.rows(batch).mask
            if rows is None:
                raise ScheduleError(f"this transformer graph takes {ENCODER_MASK} but the generation carries no T5 "
                                    "attention mask; generate through Pipeline.generate (it encodes PixArt prompts)")
            self._contexts[key] = rows.astype(dtype, copy=False)
        return self._contexts[key]

    def _added_inputs(self, context: Conditioning, variant: Variant, graph: _Graph) -> dict[str, np.ndarray]:
        """SDXL's pooled embeddings and size ids for this batch and stage, made once per run."""
        latent = concrete(self.manifest, variant).latent
        key = (variant.batch, latent)
        if key not in self._added:
            rows = context.rows(variant.batch)
            if rows.text_embeds is None:
                raise ScheduleError(f"UNet graph {graph.runner.spec.file} takes SDXL's {TEXT_EMBEDS} and {TIME_IDS} "
                                    "but the generation carries no pooled embeddings; generate through "
                                    "Pipeline.generate (it encodes SDXL prompts with both encoders)")
            scale = self.manifest.model.vae_scale_factor
            pixels = (latent[0] * scale, latent[1] * scale)
            embeds_dtype, ids_dtype = graph.added_dtypes
            self._added[key] = {TEXT_EMBEDS: rows.text_embeds.astype(embeds_dtype, copy=False),
                                TIME_IDS: context.time_ids(variant.batch, pixels).astype(ids_dtype, copy=False)}
        return self._added[key]

    def _evaluate(self, variant: Variant, scheduler: Scheduler, x: np.ndarray, t: np.generic,
                  context: Conditioning, guidance: float) -> np.ndarray:
        """One UNet evaluation; returns the (guided) noise prediction for one latent."""
        graph = self._graph(variant)
        batch = np.concatenate([x, x]) if variant.batch == 2 else x
        feed = {SAMPLE: scheduler.scale_model_input(batch, t).astype(graph.sample_dtype, copy=False),
                TIMESTEP: np.full((variant.batch,), t, dtype=graph.timestep_dtype)}
        if graph.context_dtype is not None:
            feed[CONTEXT] = self._context(context, variant.batch, graph.context_dtype)
        if graph.mask_dtype is not None:
            feed[ENCODER_MASK] = self._mask(context, variant.batch, graph.mask_dtype)
        if graph.cond_dtype is not None:
            feed[TIMESTEP_COND] = np.repeat(self._cond, variant.batch, axis=0).astype(graph.cond_dtype, copy=False)
        if graph.added_dtypes is not None:
            feed.update(self._added_inputs(context, variant, graph))
        if variant.deep == "read":
            feed[DEEP_FEATURE] = self._feature
        if variant.xattn == "read":
            feed.update({name: self._xattn[name] for name in graph.xattn_inputs})
        if self.first_call_age_s is None:
            self.first_call_age_s = process_age_s()
        outputs = graph.runner.infer(feed)  # the runner's arrays: copy what outlives this call
        if variant.deep == "write":
            self._feature = outputs[DEEP_FEATURE].copy()
        if variant.xattn == "write":
            self._xattn = {name: self._keep_map(value) for name, value in outputs.items()
                           if name.startswith(XATTN_PREFIX)}
        prediction = np.array(outputs[NOISE_PRED], dtype=np.float32)  # ours: multistep solvers keep it
        if variant.batch == 1:
            return prediction
        uncond, cond = prediction[:1], prediction[1:]
        if guidance <= 1.0:  # guidance off: the conditional prediction alone
            return cond
        # Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + w (eps_c - eps_u).
        return uncond + np.float32(guidance) * (cond - uncond)

    def _keep_map(self, value: np.ndarray) -> np.ndarray:
        """What a capture keeps of an attn2 output (a copy: the runner owns ``value``): one row, for the
        batch-1 steps after the gate. "cond" keeps the conditional half (PostDiff), "ave" the mean of
        both halves (T-GATE)."""
        if value.shape[0] == 1:
            return value.copy()
        if self.schedule.xattn_mode == "ave":
            host = np.asarray(value)  # a device runner's map comes to the host for the mean
            return ((host[:1] + host[1:]) / 2).astype(host.dtype)
        return value[1:].copy()
