"""Many images from one load: numbered files, one progress bar, a failure that keeps what was written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from postdiff.errors import GenerationError, InputError, PostdiffError
from postdiff.runtime.image import image_format, save_image
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.prompts import PromptJob
from postdiff.runtime.schedule import Schedule


def batch_requests(jobs: Sequence[PromptJob], base: GenerateOptions, num_images: int) -> list[GenerateOptions]:
    """``num_images`` requests per job, on consecutive seeds from the job's seed (or ``base.seed``)."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise InputError(f"--num-images {num_images} is not a whole number >= 1")
    requests = []
    for job in jobs:
        first = base.seed if job.seed is None else job.seed
        for k in range(num_images):
            requests.append(GenerateOptions(prompt=job.prompt, negative_prompt=job.negative_prompt, seed=first + k,
                                            steps=base.steps, guidance=base.guidance, scheduler=base.scheduler))
    return requests


def output_paths(out: Path, count: int, overwrite: bool = False) -> list[Path]:
    """Where ``count`` images go: ``out`` itself for one, else ``STEM-000.SUFFIX``, ``STEM-001.SUFFIX`` ...
    beside it; InputError, before anything is computed, for a suffix postdiff cannot write, a missing
    folder, a name that is a folder, or (without ``overwrite``) a file that exists."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; name an image file (e.g. {out / 'image.png'})")
    image_format(out)
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    width = max(3, len(str(count - 1)))
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i:0{width}d}{out.suffix}") for i in range(count)]
    for path in paths:
        if path.is_dir():
            raise InputError(f"--out {path} is a folder; name an image file (e.g. {path / 'image.png'})")
        if path.exists() and not overwrite:
            raise InputError(f"--out {path} already exists; choose another name or pass --overwrite")
    return paths


def generate_batch(pipeline: Pipeline, requests: Sequence[GenerateOptions], paths: Sequence[Path],
                   schedule: Schedule | None = None, progress: bool = True) -> list[Path]:
    """Generate ``requests[i]`` into ``paths[i]`` from one loaded pipeline, each image written
    atomically as soon as it is done.

    Every request is checked first (options, prompts against the tokenizer, the schedule's graphs,
    the memory budget): bad input raises InputError/ScheduleError before any compute. A failure
    while generating names the request (a PostdiffError keeps its class, anything else becomes a
    GenerationError); the images written before it stay.
    """
    if len(requests) != len(paths):
        raise InputError(f"{len(requests)} requests but {len(paths)} output paths")
    plans = []
    for options in requests:
        options.validate()
        pipeline.token_ids(options.prompt)
        pipeline.token_ids(options.negative_prompt)
        plan = schedule if schedule is not None else pipeline.plan_for(options)
        pipeline.executor(plan)
        pipeline.check_memory(plan)
        plans.append(plan)
    written: list[Path] = []
    total = sum(len(plan.steps) for plan in plans)
    with tqdm(total=total, desc=f"{len(requests)} image{'s' if len(requests) != 1 else ''}", unit="step",
              disable=not progress) as bar:
        for number, (options, path) in enumerate(zip(requests, paths), start=1):
            bar.set_postfix_str(f"image {number}")
            try:
                result = pipeline.generate(options, schedule=schedule, on_step=bar.update)
                save_image(result.image, path)
            except Exception as exc:  # name the image; a PostdiffError keeps its kind (and exit code)
                if len(requests) == 1:
                    raise
                kept = f"the {len(written)} written before it are kept ({written[0]} ... {written[-1]})" if written \
                    else "none was written before it"
                kind = type(exc) if isinstance(exc, PostdiffError) else GenerationError
                raise kind(f"image {number} of {len(requests)} (prompt {options.prompt!r}, seed {options.seed}) "
                           f"failed: {exc}; {kept}") from exc
            written.append(path)
    return written
