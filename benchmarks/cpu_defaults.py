#!/usr/bin/env python3
"""What `train.py` gives a user on a CPU, by model and batch: TensorFlow's default
threading against the CPU recipe (one thread per op, one batch shard per core, the
training split on the device), each as `train.py` flags, so the measurement is what a
user runs. The rule behind `--batch_shards=auto` comes from this table.

    python benchmarks/cpu_defaults.py                  # ~10 min on 2 cores
    python benchmarks/cpu_defaults.py --models=seed --batch_sizes=256 --repeats=1

Each cell runs `train.py --mode=train` in a fresh model dir for --steps steps and reads
`train/examples_per_sec` back from its events (compilation excluded: the first step runs
alone and is not timed). The variants of one cell run back to back, in turns, --repeats
times, so the machine's drift hits them alike; the ratio is recipe / default within each
turn, reported as the median with its range.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["seed", "denoiser"], "Models to measure.")
flags.DEFINE_list("batch_sizes", ["32", "64", "256"], "Global batch sizes.")
flags.DEFINE_integer("steps", 300, "Training steps per run (the first is compilation).", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Turns of every variant per cell.", lower_bound=1)
flags.DEFINE_string("dataset", "fontdigits", "Dataset flag for train.py.")
flags.DEFINE_string("data_dir", None, "Data dir flag for train.py.")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")


def variants(cores: int) -> dict[str, list[str]]:
    """train.py flags of each variant; explicit, so they hold whatever the defaults are."""
    return {
        "default": ["--num_intra_threads=0", "--num_inter_threads=0", "--batch_shards=1",
                    "--nodata_on_device"],
        "recipe": ["--num_intra_threads=1", f"--num_inter_threads={cores}",
                   f"--batch_shards={cores}", "--data_on_device"],
        "auto": [],  # what train.py picks by itself
    }


def examples_per_sec(model_dir: str) -> float:
    from core import summaries

    rates = summaries.read_scalars(os.path.join(model_dir, "train"), "examples_per_sec")
    return rates[-1][1]


def run_once(model: str, batch: int, extra: list[str]) -> tuple[float, str]:
    model_dir = tempfile.mkdtemp(prefix="cpu_defaults-")
    try:
        cmd = [sys.executable, "train.py", "--mode=train", f"--model={model}",
               f"--batch_size={batch}", f"--train_steps={FLAGS.steps}",
               f"--log_every={FLAGS.steps}", "--steps_per_loop=50", f"--model_dir={model_dir}",
               "--checkpoint_every_secs=0", f"--eval_every={FLAGS.steps}",
               f"--dataset={FLAGS.dataset}", *extra]
        if FLAGS.data_dir:
            cmd.append(f"--data_dir={FLAGS.data_dir}")
        proc = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if proc.returncode:
            raise common.failed_run(" ".join(cmd[1:]), proc)
        chosen = [line.split("] ", 1)[-1] for line in proc.stderr.splitlines()
                  if "CPU defaults:" in line]
        kind = ("" if not chosen else "recipe" if "the CPU recipe" in chosen[0]
                else "TensorFlow's threads")
        return examples_per_sec(model_dir), kind
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def main(argv):
    del argv
    cores = common.usable_cores()
    results = {}
    for model in FLAGS.models:
        for batch in map(int, FLAGS.batch_sizes):
            rates = {name: [] for name in variants(cores)}
            chosen = ""
            for _ in range(FLAGS.repeats):
                for name, extra in variants(cores).items():
                    rate, line = run_once(model, batch, extra)
                    rates[name].append(rate)
                    chosen = line or chosen
            ratios = [r / d for r, d in zip(rates["recipe"], rates["default"])]
            auto_ratios = [a / r for a, r in zip(rates["auto"], rates["recipe"])]
            cell = {name: common.summarize(values) for name, values in rates.items()}
            cell["recipe_over_default"] = {"median": statistics.median(ratios),
                                           "min": min(ratios), "max": max(ratios)}
            cell["auto_over_recipe"] = {"median": statistics.median(auto_ratios),
                                        "min": min(auto_ratios), "max": max(auto_ratios)}
            cell["auto_chose"] = chosen
            results[f"{model}_{batch}"] = cell
            print(f"{model} batch {batch}: default {cell['default']['median']:,.0f}, recipe "
                  f"{cell['recipe']['median']:,.0f}, auto {cell['auto']['median']:,.0f} ex/s",
                  flush=True)
    context = common.machine_context(with_peaks=False)
    lines = ["# CPU defaults: TensorFlow's threading against the CPU recipe\n",
             common.context_markdown(context),
             f"`train.py --mode=train`, {FLAGS.dataset} 28x28, {FLAGS.steps} steps per run, "
             f"{FLAGS.repeats} turns per cell; examples/s from the run's own "
             "`train/examples_per_sec` (compilation excluded). `default`: TensorFlow's thread "
             f"counts, one shard, tf.data; `recipe`: --num_intra_threads=1 "
             f"--num_inter_threads={cores} --batch_shards={cores} --data_on_device; `auto`: "
             "no such flags (what train.py picks). Medians, with the range over turns.\n",
             "| model | batch | default ex/s | recipe ex/s | recipe / default | auto ex/s | "
             "auto / recipe | auto chose |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, c in results.items():
        model, batch = key.rsplit("_", 1)
        r, a = c["recipe_over_default"], c["auto_over_recipe"]
        lines.append(
            f"| {model} | {batch} | {c['default']['median']:,.0f} | {c['recipe']['median']:,.0f} "
            f"| {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) | {c['auto']['median']:,.0f} "
            f"| {a['median']:.2f}x ({a['min']:.2f}-{a['max']:.2f}) | {c['auto_chose']} |")
    common.write_report(FLAGS.output_dir, "cpu_defaults", {"context": context, "results": results},
                        lines)


if __name__ == "__main__":
    common.run(main)
