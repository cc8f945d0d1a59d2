#!/usr/bin/env python3
"""The quality tables: every `configs/quality_*.cfg`, trained and evaluated; MNIST rows
next to the published numbers, colour rows next to JPEG at the same size.

    python benchmarks/quality.py --data_dir=FOLDER      # all rows
    python benchmarks/quality.py --data_dir=FOLDER --rows=seed,vae
    python benchmarks/quality.py --rows=colour_seed,colour_resnet   # colour only, offline

FOLDER holds MNIST's test-split files (t10k-*-ubyte.gz); this repo's machines have them
at ../shared/data/mnist. Without --data_dir, train.py downloads MNIST. Colour rows
(`quality_colour_*.cfg`) train on the offline `shapes` set and need no data.

Each row runs `train.py --flagfile=configs/quality_ROW.cfg` in a fresh model dir (wall
time measured around it), then `--mode=eval` for BCE, MSE, PSNR and SSIM on the held-out
split. A colour row also gets its code's size (float32: 32 bits a number, from the
`code (...)` the run logs) and the reference users know: each held-out image saved as a
JPEG (tf.io.encode_jpeg, 4:2:0) at the highest quality whose file is not larger than the
code, and that JPEG's MSE, PSNR and SSIM. Then 8-bit codes: the run's SavedModel
(`--mode=export`, loaded in plain TensorFlow) encodes 2,000 training images for each code
channel's range and the held-out images, whose codes are stored in 8 bits a number
(`common.quantize`) and decoded; beside them JPEG at that many bytes, and JPEG's smallest
files (quality 1, optimised tables). Writes results/quality.{json,md} (MNIST rows) and
results/quality_colour.{json,md} (colour rows), each only when such rows ran. A report
keeps the rows of an earlier run that this run did not train (each row carries the date
it ran and any --extra_flags), so `--rows=NAME` updates one row of the table.
"""

from __future__ import annotations

import glob
import json
import os
import re
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


GREY = ("mnist", "fashion_mnist")  # rows of the MNIST table; every other dataset is colour


def _flagfile_value(path, name):
    for line in open(path):
        if line.startswith(f"--{name}="):
            return line.strip().split("=", 1)[1]
    return None


def code_shape(log: str) -> tuple[int, ...]:
    """One image's code shape, from the `code (8, 8, 4)` that train.py logs."""
    match = re.search(r"code \(([\d, ]+?),?\)", log)
    if not match:
        raise RuntimeError("the run's log names no code shape")
    return tuple(int(d) for d in match.group(1).split(","))


def eight_bit_codes(export_dir: str, dataset: str, held_out) -> dict:
    """The quality of a SavedModel's codes stored in 8 bits a number, on `held_out` (uint8
    images): per-channel ranges from the codes of 2,000 training images, the held-out codes
    quantised and decoded. With JPEG at the same bytes, and JPEG's smallest files."""
    import numpy as np
    import tensorflow as tf

    from core import data, metrics

    model = tf.saved_model.load(export_dir)

    def batches(fn, key, arrays):
        return np.concatenate([fn(arrays[i:i + 250])[key].numpy()
                               for i in range(0, len(arrays), 250)])

    def encode(images):
        return batches(lambda x: model.signatures["encode"](images=data.to_float(x)), "code",
                       images)

    low, high = common.code_ranges(encode(data.load_split("train[:2000]", dataset).images))
    codes = common.quantize(encode(held_out), low, high, bits=8)
    decoded = batches(lambda c: model.signatures["decode"](code=tf.constant(c)), "images", codes)
    targets = data.to_float(held_out)
    numbers = int(np.prod(codes.shape[1:]))
    return {"bits": 8 * numbers, "bytes": numbers,
            "mse": float(tf.reduce_mean(metrics.mse(targets, decoded))),
            "psnr": float(tf.reduce_mean(metrics.psnr(targets, decoded))),
            "ssim": float(tf.reduce_mean(metrics.ssim(targets, decoded))),
            "jpeg": common.jpeg_at_size(held_out, numbers),
            "jpeg_smallest": common.jpeg_smallest(held_out)}


def _colour_lines(results: dict) -> list[str]:
    lines = ["The offline shapes set, 64x64x3, against JPEG at the same size.\n",
             "Trained on `shapes` train (10,000 generated images), evaluated on its held-out "
             "test split (1,000). The code is float32 (32 bits a number). JPEG: each held-out "
             "image at the highest quality whose file fits in the code's bytes.\n",
             "| row | model | loss | epochs | code | bits | PSNR dB | SSIM | MSE | JPEG PSNR dB "
             "| JPEG SSIM | JPEG MSE | JPEG bytes (quality) | wall s |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| --- | ---: |"]
    for name, r in results.items():
        j = r["jpeg"]
        jpeg = (f"{j['psnr']:.2f} | {j['ssim']:.3f} | {j['mse']:.4f} | {j['mean_bytes']:.0f} "
                f"(q {j['quality_min']}-{j['quality_max']}, median {j['quality_median']:g})"
                if j["fit"] else "none fits | - | - | -")
        if j["fit"] and j["fit"] < j["images"]:
            jpeg += f", {j['fit']}/{j['images']} images fit"
        lines.append(f"| [{name}]({r['config']}) | {r['model']} | {r['loss']} | {r['epochs']} | "
                     f"{r['code']} | {r['code_bits']:,} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                     f"{r['mse']:.4f} | {jpeg} | {r['seconds']:.0f} |")
    lines += ["\nThe same codes stored in 8 bits a number (each channel's range from 2,000 "
              "training codes: 2 floats a channel, constants of the codec), decoded by the "
              "exported SavedModel. Beside each row, JPEG at the code's bytes where its files "
              "fit, and JPEG's smallest file (quality 1, optimised Huffman tables) for codes "
              "smaller than any JPEG.\n",
              "| row | code bytes | PSNR dB | SSIM | MSE | JPEG at the code's bytes "
              "| JPEG smallest: mean bytes | JPEG smallest: PSNR dB | SSIM |",
              "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for name, r in results.items():
        e = r["eight_bit"]
        j, smallest = e["jpeg"], e["jpeg_smallest"]
        at_size = (f"{j['psnr']:.2f} dB, SSIM {j['ssim']:.3f}, MSE {j['mse']:.4f}, "
                   f"{j['fit']}/{j['images']} images fit" if j["fit"]
                   else "none fits")
        lines.append(f"| {name} | {e['bytes']:,} | {e['psnr']:.2f} | {e['ssim']:.3f} | "
                     f"{e['mse']:.4f} | {at_size} | {smallest['mean_bytes']:.0f} "
                     f"(min {smallest['min_bytes']}) | {smallest['psnr']:.2f} | "
                     f"{smallest['ssim']:.3f} |")
    return lines


def _merged(output_dir: str, name: str, results: dict) -> tuple[dict, list[str]]:
    """`results` over the rows an earlier run wrote to NAME.json whose configs still exist;
    and a note naming the rows kept from it, with their dates (empty when none is kept)."""
    path = os.path.join(output_dir, f"{name}.json")
    if not os.path.exists(path):
        return results, []
    with open(path) as f:
        earlier = json.load(f)
    kept = {k: {"date": earlier["context"]["date"], **v}
            for k, v in earlier["results"].items()
            if k not in results and os.path.exists(os.path.join(common.ROOT, v["config"]))}
    if not kept:
        return results, []
    note = ("Rows kept from an earlier run of this script: " + ", ".join(
        f"{k} ({v['date']})" for k, v in kept.items()) + ".\n")
    return dict(sorted({**kept, **results}.items())), [note]


def _extra_flags_note(results: dict) -> list[str]:
    flagged = [f"{k} ({' '.join(v['extra_flags'])})" for k, v in results.items()
               if v.get("extra_flags")]
    return [f"Rows run with --extra_flags, not as their config reads: {', '.join(flagged)}.\n"
            ] if flagged else []


def main(argv):
    del argv
    import numpy as np

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
        dataset = _flagfile_value(cfg, "dataset")
        common_flags = [f"--flagfile={cfg}", f"--model_dir={model_dir}", *FLAGS.extra_flags]
        if FLAGS.data_dir and dataset in GREY:
            common_flags.append(f"--data_dir={FLAGS.data_dir}")
        print(f"training {name}...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "train.py", *common_flags, "--mode=train"],
                              cwd=common.ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            raise common.failed_run(f"training {name}", proc)
        proc = subprocess.run([sys.executable, "train.py", *common_flags, "--mode=eval"],
                              cwd=common.ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise common.failed_run(f"the eval of {name}", proc)
        with open(os.path.join(model_dir, "eval_results.json")) as f:
            metrics = json.load(f)
        results[name] = {**metrics, "seconds": seconds, "config": os.path.relpath(cfg, common.ROOT),
                         "model": _flagfile_value(cfg, "model"),
                         "epochs": _flagfile_value(cfg, "epochs"),
                         "dataset": dataset, "loss": _flagfile_value(cfg, "loss") or "bce",
                         "noise_factor": float(_flagfile_value(cfg, "noise_factor") or 0),
                         "published": PUBLISHED.get(name, "-"),
                         "date": time.strftime("%Y-%m-%d"), "extra_flags": FLAGS.extra_flags}
        if dataset not in GREY:  # colour: the code's size and JPEG at that size
            from core import data

            shape = code_shape(proc.stderr)
            numbers = int(np.prod(shape))
            given = [f.split("=", 1)[1] for f in FLAGS.extra_flags
                     if f.startswith("--eval_split=")]
            eval_split = (given or [_flagfile_value(cfg, "eval_split") or "test"])[-1]
            split = data.load_split(eval_split, dataset)
            results[name].update(code="x".join(map(str, shape)), code_bits=32 * numbers,
                                 jpeg=common.jpeg_at_size(split.images, 4 * numbers))
            proc = subprocess.run([sys.executable, "train.py", *common_flags, "--mode=export"],
                                  cwd=common.ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise common.failed_run(f"the export of {name}", proc)
            export_dir = re.search(r"reconstruct to (\S+)", proc.stderr).group(1)
            results[name]["eight_bit"] = eight_bit_codes(export_dir, dataset, split.images)
        print(f"{name}: bce {metrics['bce']:.4f}, psnr {metrics['psnr']:.2f} in {seconds:.0f} s",
              flush=True)
    context = common.machine_context(with_peaks=False)
    colour = {k: v for k, v in results.items() if v["dataset"] not in GREY}
    results_mnist = {k: v for k, v in results.items() if v["dataset"] in GREY}
    if results_mnist:
        results_mnist, kept = _merged(FLAGS.output_dir, "quality", results_mnist)
        lines = ["# Quality on real MNIST\n", common.context_markdown(context), *kept,
                 *_extra_flags_note(results_mnist),
                 "Trained on MNIST `test[:8000]`, evaluated on the held-out `test[8000:]` (2,000 "
                 "images); the published numbers train on the 60,000-image training set and "
                 "evaluate on the 10,000-image test set.\n",
                 "| row | model | noise | epochs | held-out BCE | MSE | PSNR dB | SSIM | wall s "
                 "| published |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, r in results_mnist.items():
            lines.append(f"| [{name}]({r['config']}) | {r['model']} | {r['noise_factor']:g} | "
                         f"{r['epochs']} | {r['bce']:.4f} | {r['mse']:.4f} | {r['psnr']:.2f} | "
                         f"{r['ssim']:.3f} | {r['seconds']:.0f} | {r['published']} |")
        common.write_report(FLAGS.output_dir, "quality",
                            {"context": context, "results": results_mnist}, lines)
    if colour:
        colour, kept = _merged(FLAGS.output_dir, "quality_colour", colour)
        lines = ["# Quality in colour\n", common.context_markdown(context), *kept,
                 *_extra_flags_note(colour), *_colour_lines(colour)]
        common.write_report(FLAGS.output_dir, "quality_colour",
                            {"context": context, "results": colour}, lines)

if __name__ == "__main__":
    common.run(main)
