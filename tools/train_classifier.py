"""Train the small MNIST digit classifier used for postdiff's fidelity metrics on ``digits``.

A small CNN (BatchNorm, ReLU) trained on the 4,000-digit train split only (tools/digits_data.py),
with random +-2 pixel shifts as augmentation, for a fixed number of epochs (no model selection on
the held-out split; it is used once, to report accuracy). Exported to ONNX (opset 17, legacy
exporter, dynamic batch):

    input  "image"    (N, 1, 32, 32) float32 in [-1, 1]   (background -1, digit +1)
    output "logits"   (N, 10)
    output "features" (N, 128)  penultimate layer (post-ReLU), for digit-FID

The ONNX Runtime output is checked against torch (max abs diff < 1e-4). Writes
``OUT/classifier.onnx`` and ``OUT/classifier.json`` (metadata, held-out accuracy) and merges a
"classifier" entry into ``OUT/../TRAINING.json``.

Usage:
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python tools/train_classifier.py \
        --out exporter/builtin/digits/classifier
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
import torch.nn as nn
import torch.nn.functional as F

from postdiff.files import atomic_path, write_text_atomic
from postdiff.tools.digits_data import load_split, record_training

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-conv128-pool-fc128-fc10 with BatchNorm."""

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(1, 32), block(32, 32), nn.MaxPool2d(2),     # 16x16
            block(32, 64), block(64, 64), nn.MaxPool2d(2),    # 8x8
            block(64, 128), nn.MaxPool2d(2),                  # 4x4
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(128 * 4 * 4, feature_dim, bias=False),
                                nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, 10)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (logits (N, 10), features (N, feature_dim)) for images (N, 1, 32, 32) in [-1, 1]."""
        features = self.fc(self.body(image))
        return self.head(self.dropout(features)), features


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """Logits and features for all of ``x`` (eval mode)."""
    model.eval()
    logits, feats = [], []
    for i in range(0, len(x), batch):
        lo, fe = model(x[i:i + batch])
        logits.append(lo)
        feats.append(fe)
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


def export_onnx(model: nn.Module, path: Path, sample: torch.Tensor) -> float:
    """Export to ONNX (opset 17, dynamo=False, dynamic batch); return max |ORT - torch|."""
    import onnx
    import onnxruntime as ort

    model.eval()
    torch.onnx.export(
        model, (sample[:2],), str(path), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["logits", "features"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}, "features": {0: "N"}},
    )
    onnx.checker.check_model(onnx.load(str(path)))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    lo_t, fe_t = predict(model, sample)
    lo_o, fe_o = sess.run(["logits", "features"], {"image": sample.numpy()})
    return float(max(np.abs(lo_o - lo_t).max(), np.abs(fe_o - fe_t).max()))


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("exporter/builtin/digits/classifier"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    (x_tr, y_tr), (x_ho, y_ho) = load_split()
    x_tr, y_tr = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    x_ho_t = torch.from_numpy(x_ho)

    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(x_tr) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x = random_shift(x_tr[idx], 2, gen)
            logits, _ = model(x)
            loss = F.cross_entropy(logits, y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y_tr[idx]).sum().item()
            total += len(idx)
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / total:.4f} "
              f"train acc {correct / total:.4f} ({time.time() - t0:.0f}s)", flush=True)
    train_time = time.time() - t0

    logits, _ = predict(model, x_ho_t)
    acc = float((logits.argmax(1) == y_ho).mean())
    per_class = [float((logits.argmax(1)[y_ho == c] == c).mean()) for c in range(10)]
    print(f"held-out accuracy {acc:.4f} per class {np.round(per_class, 3).tolist()}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "classifier.onnx"
    diff = export_onnx(model, onnx_path, x_ho_t[:256])
    print(f"ONNX vs torch max abs diff {diff:.2e}", flush=True)
    if diff >= 1e-4:
        raise SystemExit(f"ONNX output differs from torch by {diff:.2e} (>= 1e-4)")

    command = ("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python tools/train_classifier.py "
               + " ".join(sys.argv[1:] if argv is None else argv))
    meta = {
        "file": "classifier.onnx",
        "opset": 17,
        "input": {"name": "image", "shape": ["N", 1, 32, 32], "dtype": "float32",
                  "range": [-1.0, 1.0], "background": -1.0},
        "outputs": {"logits": ["N", 10], "features": ["N", FEATURE_DIM]},
        "features": "penultimate layer (Linear-BatchNorm-ReLU), used for digit-FID",
        "architecture": "conv32-conv32-pool-conv64-conv64-pool-conv128-pool-fc128-fc10, BatchNorm, ReLU",
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_on": "tools/digits_data.py train split (4,000 digits), +-2 px random shifts",
        "heldout_accuracy": acc,
        "heldout_accuracy_per_class": per_class,
        "heldout_size": int(len(y_ho)),
        "onnx_vs_torch_max_abs_diff": diff,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"AdamW one-cycle max lr {args.lr}, weight_decay 1e-4, label smoothing 0.05",
        "training_wall_time_s": round(train_time, 1),
        "threads": args.threads,
        "command": command,
    }
    write_text_atomic(args.out / "classifier.json", json.dumps(meta, indent=2) + "\n")
    write_heldout_features(onnx_path)
    record_training(args.out.parent, "classifier", {k: meta[k] for k in (
        "architecture", "parameters", "heldout_accuracy", "seed", "epochs", "training_wall_time_s", "command")})
    print(f"wrote {onnx_path} and {args.out / 'classifier.json'}", flush=True)


def write_heldout_features(onnx_path: Path) -> None:
    """Save the exported classifier's features of the held-out digits beside it (the digit-FID
    reference set :class:`postdiff.tools.evaluate.DigitJudge` loads)."""
    from postdiff.tools.metrics import DigitClassifier

    _, (heldout, _) = load_split()
    features = DigitClassifier(onnx_path).predict(heldout)[1].astype(np.float32)
    with atomic_path(onnx_path.with_name("heldout_features.npy")) as tmp, open(tmp, "wb") as handle:
        np.save(handle, features)


if __name__ == "__main__":
    main()
