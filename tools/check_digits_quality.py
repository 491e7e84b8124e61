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
import json
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from postdiff.tools.digits_data import load_split


def load_model(folder: Path):
    """UNet, label table (11, L, D), null label and DDIM scheduler from an exported folder."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    cfg = json.loads((folder / "label_encoder" / "config.json").read_text())
    table = load_file(str(folder / "label_encoder" / cfg["file"]))[cfg["tensor"]]
    sched = DDIMScheduler.from_pretrained(str(folder / "scheduler"))
    return unet, table, int(cfg["null_label"]), sched


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


def classify(onnx_path: Path, x: np.ndarray, batch: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """Logits and penultimate features from the ONNX classifier (one thread)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    lo, fe = [], []
    for i in range(0, len(x), batch):
        a, b = sess.run(["logits", "features"], {"image": x[i:i + batch].astype(np.float32)})
        lo.append(a)
        fe.append(b)
    return np.concatenate(lo), np.concatenate(fe)


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples)."""
    from scipy import linalg

    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def save_grid(x: np.ndarray, per_row: int, path: Path) -> None:
    """Save images (N, 1, 32, 32) in [-1, 1] as a PNG grid, ``per_row`` images per row."""
    from PIL import Image

    n = len(x)
    rows = (n + per_row - 1) // per_row
    grid = np.full((rows * 32, per_row * 32), 0, dtype=np.uint8)
    img = ((x[:, 0] + 1) * 127.5).clip(0, 255).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, per_row)
        grid[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = img[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


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

    onnx_path = args.model / "classifier" / "classifier.onnx"
    logits, feats = classify(onnx_path, gen)
    pred = logits.argmax(1)
    y = labels.numpy()
    adherence = float((pred == y).mean())
    per_class = [float((pred[y == c] == c).mean()) for c in range(10)]

    (x_tr, y_tr), (x_ho, y_ho) = load_split()
    _, f_ho = classify(onnx_path, x_ho)
    _, f_tr = classify(onnx_path, x_tr)
    rng = np.random.default_rng(0)
    sub = np.concatenate([rng.choice(np.flatnonzero(y_tr == c), len(y_ho) // 10, replace=False)
                          for c in range(10)])
    fid = frechet(feats, f_ho)
    floor_1k = frechet(f_tr[sub], f_ho)
    floor_4k = frechet(f_tr, f_ho)

    print(f"class adherence {adherence:.4f} per class {np.round(per_class, 3).tolist()}")
    print(f"digit-FID generated vs held-out: {fid:.3f}")
    print(f"digit-FID floor, train (1,000 stratified) vs held-out: {floor_1k:.3f}; "
          f"train (4,000) vs held-out: {floor_4k:.3f}")
    print(f"sampling time {sample_time:.0f}s for {len(gen)} images")

    if args.grid is not None:
        first = np.concatenate([gen[y == c][:10] for c in range(10)])
        save_grid(first, 10, args.grid)
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
        tj = args.model / "TRAINING.json"
        merged = json.loads(tj.read_text()) if tj.exists() else {}
        merged[key] = rec
        tj.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
