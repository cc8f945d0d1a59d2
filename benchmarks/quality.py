#!/usr/bin/env python3
"""The quality table: every `configs/quality_*.cfg`, trained and evaluated, next to the
published numbers.

    python benchmarks/quality.py --data_dir=FOLDER      # all rows, ~10 minutes on 2 CPU cores
    python benchmarks/quality.py --data_dir=FOLDER --rows=seed,vae

FOLDER holds MNIST's test-split files (t10k-*-ubyte.gz); this repo's machines have them
at ../shared/data/mnist. Without --data_dir, train.py downloads MNIST.

Each row runs `train.py --flagfile=configs/quality_ROW.cfg` in a fresh model dir (wall
time measured around it), then `--mode=eval` for BCE, MSE, PSNR and SSIM on the held-out
split. Writes results/quality.{json,md}.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", [], "Only these rows (config names after quality_).")
flags.DEFINE_string("data_dir", None, "MNIST files for every row (default: download).")
flags.DEFINE_list("extra_flags", [], "Flags appended to every row, e.g. --epochs=1 for a smoke run.")
flags.DEFINE_string("runs_dir", os.path.join(common.ROOT, "runs", "quality"), "Model dirs.")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"), "Reports go here.")

# What the original write-ups report (full 60k MNIST training set, 10k test set).
PUBLISHED = {
    "keras_blog": "BCE ~0.094 after 50 epochs (Keras blog, 'Building Autoencoders in Keras')",
    "denoiser": "val BCE 0.0622 after 50 epochs, clean (keras.io 'Convolutional autoencoder "
                "for image denoising')",
    "denoiser_noise04": "val BCE 0.0839 after 100 epochs at noise 0.4 (same keras.io example)",
}


def _flagfile_value(path, name):
    for line in open(path):
        if line.startswith(f"--{name}="):
            return line.strip().split("=", 1)[1]
    return None


def main(argv):
    del argv
    configs = sorted(glob.glob(os.path.join(common.ROOT, "configs", "quality_*.cfg")))
    rows = {os.path.basename(c)[len("quality_"):-len(".cfg")]: c for c in configs}
    if FLAGS.rows:
        unknown = set(FLAGS.rows) - set(rows)
        if unknown:
            raise app.UsageError(f"unknown rows {sorted(unknown)}: choose from {sorted(rows)}")
        rows = {k: v for k, v in rows.items() if k in FLAGS.rows}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    results = {}
    for name, cfg in rows.items():
        model_dir = os.path.join(FLAGS.runs_dir, name)
        shutil.rmtree(model_dir, ignore_errors=True)
        common_flags = [f"--flagfile={cfg}", f"--model_dir={model_dir}", *FLAGS.extra_flags]
        if FLAGS.data_dir:
            common_flags.append(f"--data_dir={FLAGS.data_dir}")
        print(f"training {name}...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "train.py", *common_flags, "--mode=train"],
                              cwd=common.ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        proc = subprocess.run([sys.executable, "train.py", *common_flags, "--mode=eval"],
                              cwd=common.ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name} eval failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(model_dir, "eval_results.json")) as f:
            metrics = json.load(f)
        results[name] = {**metrics, "seconds": seconds, "config": os.path.relpath(cfg, common.ROOT),
                         "model": _flagfile_value(cfg, "model"),
                         "epochs": _flagfile_value(cfg, "epochs"),
                         "noise_factor": float(_flagfile_value(cfg, "noise_factor") or 0),
                         "published": PUBLISHED.get(name, "-")}
        print(f"{name}: bce {metrics['bce']:.4f} in {seconds:.0f} s", flush=True)
    context = common.machine_context(with_peaks=False)
    lines = ["# Quality on real MNIST\n", common.context_markdown(context),
             "Trained on MNIST `test[:8000]`, evaluated on the held-out `test[8000:]` (2,000 "
             "images); the published numbers train on the 60,000-image training set and "
             "evaluate on the 10,000-image test set.\n",
             "| row | model | noise | epochs | held-out BCE | MSE | PSNR dB | SSIM | wall s "
             "| published |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        lines.append(f"| [{name}]({r['config']}) | {r['model']} | {r['noise_factor']:g} | "
                     f"{r['epochs']} | {r['bce']:.4f} | {r['mse']:.4f} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.3f} | {r['seconds']:.0f} | {r['published']} |")
    common.write_report(FLAGS.output_dir, "quality", {"context": context, "results": results}, lines)


if __name__ == "__main__":
    app.run(main)
