"""Train a small f_B model on a given device and check its export against torch.

Usage:
    python benchmarks/train_device_check.py --device cuda [--sharp-dir DIR] [--epochs 3]

Builds a dataset from the four Set5 photos of the shared train_sharp folder
(≤ 200 edge positions each, split 2/1/1 by image, seed 0), trains f_B with
the paper's two stages (1 epoch of f_C, then ``--epochs``) on ``--device``,
and prints per-epoch loss, validation accuracy and throughput. Then it
compares, on the test photo, the labels torch predicts on the device with
those of the exported ONNX file run by onnxruntime on the CPU (the way
inference runs it): they must agree but for near ties. Exits non-zero if
the loss did not fall, accuracy is not above chance, or the two disagree on
more than 0.5 % of the test samples.

This is the check for `dhde train fit --device cuda` on a machine with a
GPU; CI has none, and runs the same training path on the CPU
(tests/test_training.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from dhde.model import DefocusModel
from dhde.training import dataset
from dhde.training.fit import fit, load_checkpoint, predict_labels, resolve_device

SHARED = Path(os.environ.get("DHDE_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))
SET5 = ["Set5/baby.png", "Set5/bird.png", "Set5/butterfly.png", "Set5/head.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--sharp-dir", type=Path, default=SHARED / "data" / "train_sharp")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the final stage")
    args = parser.parse_args()
    device = resolve_device(args.device)
    missing = [name for name in SET5 if not (args.sharp_dir / name).exists()]
    if missing:
        sys.exit(f"missing photos under {args.sharp_dir}: {missing}")

    import torch

    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        dataset.build_dataset(args.sharp_dir, work / "data", seed=0, max_positions_per_image=200,
                              split=(0.5, 0.25, 0.25), images=SET5, progress=False)
        result = fit(work / "data", work / "model.onnx", features="B", epochs=args.epochs, pretrain_epochs=1,
                     seed=0, lr=2e-3, device=device, log=lambda line: print(line, flush=True))
        test = dataset.load_split(work / "data", "test")
        net = load_checkpoint(result.checkpoint_path).to(device)
        torch_labels, _ = predict_labels(net, test)
        model = DefocusModel.load(result.model_path, num_threads=1)
        prob = model.predict(test.dct.astype(np.float32), test.grd.astype(np.float32),
                             test.svd.astype(np.float32), test.patch)
        onnx_labels = prob.argmax(axis=1)
        top2 = np.sort(prob, axis=1)[:, -2:]
        differ = torch_labels != onnx_labels
        near_tie = (top2[:, 1] - top2[:, 0]) < 1e-4
        print(f"test samples {len(test)}: torch on {device} and onnxruntime on the CPU disagree on "
              f"{differ.sum()} ({differ.sum() - (differ & near_tie).sum()} of them not near ties); "
              f"test accuracy {result.test.accuracy:.4f} (chance {1 / 11:.4f}); "
              f"{result.training_samples_per_second:.0f} training samples/s")
    failures = []
    if not result.history[-1].train_loss < result.history[0].train_loss:
        failures.append("training loss did not fall")
    if not result.test.accuracy > 1.5 / 11:
        failures.append("test accuracy not clearly above chance")
    if differ.mean() > 0.005:
        failures.append("exported model disagrees with torch")
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("OK")


if __name__ == "__main__":
    main()
