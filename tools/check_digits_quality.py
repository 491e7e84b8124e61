"""Quality floor of the embedded ``digits`` model: class adherence and digit-FID.

Samples N digits per class from the exported model folder with torch + diffusers DDIMScheduler
(20 steps, eta 0, classifier-free guidance with the null label, scale 3.0 by default), classifies
them with the exported ONNX classifier, and reports:

* class adherence: the fraction of samples classified as the label they were generated for;
* digit-FID: the Frechet distance between the classifier's penultimate features (``features``
  output) of the generated samples and of the 1,000 held-out real digits;
* the floor of that figure: the same distance between held-out real digits and a 1,000-digit
  stratified subset of the training digits (and all 4,000 training digits).

Optionally (``--lowres-steps K``) the first K steps run at 16x16 (mixed-resolution denoising):
at the switch timestep the model's output on the 16x16 state gives x0_hat, which is upsampled
bilinearly to 32x32 and re-noised to the same timestep with fresh seeded noise; the full-resolution
run continues from that timestep.

The figures are merged into ``MODEL/TRAINING.json`` under "quality" (``--no-record`` to skip).

Usage:
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python \
        tools/check_digits_quality.py --model exporter/builtin/digits [--per-class 100] \
        [--guidance 3.0] [--steps 20] [--lowres-steps 0] [--grid SAMPLES.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from postdiff.runtime.image import to_uint8
from postdiff.tools.digits_data import load_split, record_training
from postdiff.tools.grid import make_grid
from postdiff.tools.metrics import DigitClassifier, frechet_distance


def load_model(folder: Path):
    """UNet, label table (11, L, D), null label and DDIM scheduler of a digits model folder."""
    from diffusers import DDIMScheduler

    from postdiff.exporter.models import load_model as load_loaded

    model = load_loaded(str(folder))
    return (model.unet, model.text_encoder.table.detach(), len(model.labels),
            DDIMScheduler.from_config(model.scheduler_config))


@torch.no_grad()
def sample(unet, table: torch.Tensor, null_label: int, sched, labels: torch.Tensor, steps: int,
           guidance: float, seed: int, lowres_steps: int = 0) -> torch.Tensor:
    """Generate one 1x32x32 image per label with DDIM + classifier-free guidance.

    Returns images (N, 1, 32, 32) in [-1, 1] (clamped).
    """
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    sched.set_timesteps(steps)
    cond = table[labels]
    uncond = table[torch.full_like(labels, null_label)]
    ctx = torch.cat([uncond, cond])
    side = 16 if lowres_steps > 0 else 32
    x = torch.randn((n, 1, side, side), generator=g)

    def eps_at(x_: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = unet(torch.cat([x_, x_]), t, encoder_hidden_states=ctx).sample
        e_u, e_c = e.chunk(2)
        return e_u + guidance * (e_c - e_u)

    for i, t in enumerate(sched.timesteps):
        if lowres_steps > 0 and i == lowres_steps:
            a = sched.alphas_cumprod[t]
            x0 = (x - (1 - a).sqrt() * eps_at(x, t)) / a.sqrt()
            x0 = F.interpolate(x0, size=(32, 32), mode="bilinear", align_corners=False)
            x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn((n, 1, 32, 32), generator=g)
        x = sched.step(eps_at(x, t), t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("exporter/builtin/digits"))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--lowres-steps", type=int, default=0, help="first K steps at 16x16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--grid", type=Path, default=None, help="write a PNG of the first 10 per class")
    ap.add_argument("--no-record", action="store_true", help="do not write TRAINING.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    unet, table, null_label, sched = load_model(args.model)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    t0 = time.time()
    out = []
    for bi, i in enumerate(range(0, len(labels), args.batch)):
        out.append(sample(unet, table, null_label, sched, labels[i:i + args.batch], args.steps,
                          args.guidance, seed=args.seed * 100003 + bi, lowres_steps=args.lowres_steps))
        print(f"sampled {i + len(out[-1])}/{len(labels)} ({time.time() - t0:.0f}s)", flush=True)
    gen = torch.cat(out).numpy()
    sample_time = time.time() - t0

    classifier = DigitClassifier(args.model / "classifier" / "classifier.onnx")
    pred, feats = classifier.predict(gen)
    y = labels.numpy()
    adherence = float((pred == y).mean())
    per_class = [float((pred[y == c] == c).mean()) for c in range(10)]

    (x_tr, y_tr), (x_ho, y_ho) = load_split()
    f_ho = classifier.predict(x_ho)[1]
    f_tr = classifier.predict(x_tr)[1]
    rng = np.random.default_rng(0)
    sub = np.concatenate([rng.choice(np.flatnonzero(y_tr == c), len(y_ho) // 10, replace=False)
                          for c in range(10)])
    fid = frechet_distance(feats, f_ho)
    floor_1k = frechet_distance(f_tr[sub], f_ho)
    floor_4k = frechet_distance(f_tr, f_ho)

    print(f"class adherence {adherence:.4f} per class {np.round(per_class, 3).tolist()}")
    print(f"digit-FID generated vs held-out: {fid:.3f}")
    print(f"digit-FID floor, train (1,000 stratified) vs held-out: {floor_1k:.3f}; "
          f"train (4,000) vs held-out: {floor_4k:.3f}")
    print(f"sampling time {sample_time:.0f}s for {len(gen)} images")

    if args.grid is not None:
        pixels = to_uint8(gen)
        make_grid([list(pixels[y == c][:10]) for c in range(10)], [str(c) for c in range(10)]).save(args.grid)
        print(f"wrote {args.grid}")

    if not args.no_record:
        key = "quality" if args.lowres_steps == 0 else f"quality_lowres{args.lowres_steps}"
        command = ("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python "
                   "tools/check_digits_quality.py " + " ".join(sys.argv[1:] if argv is None else argv))
        rec = {
            "sampler": f"diffusers DDIMScheduler, {args.steps} steps, eta 0, classifier-free guidance "
                       f"scale {args.guidance} (null label)"
                       + (f", first {args.lowres_steps} steps at 16x16 (x0_hat upsampled bilinearly "
                          f"and re-noised to the switch timestep)" if args.lowres_steps else ""),
            "samples_per_class": args.per_class,
            "samples": int(len(gen)),
            "seed": args.seed,
            "class_adherence": round(adherence, 4),
            "class_adherence_per_class": [round(v, 3) for v in per_class],
            "digit_fid_generated_vs_heldout": round(fid, 3),
            "digit_fid_floor_train1k_vs_heldout": round(floor_1k, 3),
            "digit_fid_floor_train4k_vs_heldout": round(floor_4k, 3),
            "digit_fid_features": "classifier/classifier.onnx 'features' (penultimate, 128-d)",
            "sampling_wall_time_s": round(sample_time, 1),
            "threads": args.threads,
            "command": command,
        }
        record_training(args.model, key, rec)


if __name__ == "__main__":
    main()
