#!/usr/bin/env python3
"""Whole-process seconds until a held-out BCE target: tapeloop's recipe against the tutorial's,
for several seeds on two disjoint splits.

    python benchmarks/time_to_quality.py --data_dir=../shared/data/mnist    # ~8 min here

Each run is one process, timed from its launch to the log line that reports the target
reached (so imports, data loading, compilation and evaluation all count), then stopped:
- tapeloop: `python train.py --flagfile=configs/fast_mnist.cfg --data_dir=.. --train_split=..
  --eval_split=.. --seed=S` (the recipe is the flag file; its eval lines are read);
- the tutorial: `python benchmarks/tutorial_recipe.py` (Keras `fit`, batch 64, Adam 1e-3,
  the held-out BCE after every epoch) with the same splits and seed.
The two are interleaved seed by seed, so the machine's drift hits both.

Splits of MNIST's test set (what this machine has; users with the full set can pass
`--splits=train:test`):
- `tuning`: train `test[:8000]`, evaluate `test[8000:]`: the recipe was chosen on it;
- `held_out`: train `test[2000:]`, evaluate `test[:2000]`: reported as it came out.
Writes results/time_to_quality.{json,md,png}: per split the median and the worst seed of
each recipe, every seed's time, and every curve.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "MNIST's files (the t10k IDX .gz files or mnist.npz); "
                    "without it MNIST is downloaded into Keras' cache.")
flags.DEFINE_string("dataset", "mnist", "The dataset both recipes read.")
flags.DEFINE_list("splits", ["test[:8000]:test[8000:]", "test[2000:]:test[:2000]"],
                  "TRAIN:EVAL split pairs; the first is the one the recipe was tuned on.")
flags.DEFINE_integer("seeds", 5, "Seeds 0..N-1 of each recipe on each split.", lower_bound=1)
flags.DEFINE_string("recipe", os.path.join(common.ROOT, "configs", "fast_mnist.cfg"),
                    "tapeloop's recipe: a train.py flag file.")
flags.DEFINE_list("extra_flags", [], "More train.py flags for tapeloop's runs (recipe trials), "
                  "e.g. --extra_flags=--learning_rate=0.01,--warmup_steps=50.")
flags.DEFINE_list("contenders", ["tapeloop", "tutorial"], "Which recipes to run.")
flags.DEFINE_float("target", 0.14, "Held-out BCE to reach.")
flags.DEFINE_float("max_seconds", 150.0, "A run that has not reached the target by then is "
                   "stopped and counts as not reached.")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")

NAMES = {"tapeloop": "tapeloop (configs/fast_mnist.cfg through train.py)",
         "tutorial": "tutorial (Keras fit, batch 64, Adam 1e-3, eval every epoch)"}
# tapeloop's eval line, e.g. "eval | step 558 | bce 0.1413 | ...", or "eval (EMA weights) | ..."
OURS = re.compile(r"\beval(?: \([^)]*\))? \| step (\d+) \|.*?\bbce ([0-9.]+)")
TUTORIAL = re.compile(r"^epoch (\d+) \| held-out bce ([0-9.]+)")


def timed_run(cmd: list[str], pattern: re.Pattern, target: float, max_seconds: float) -> dict:
    """Runs `cmd`, timing each line that matches `pattern` (groups: step, bce) from launch;
    kills the process at the first BCE <= target or after `max_seconds`. The process gets
    a temporary dir of its own, removed after it: a killed process leaves the temporary
    files that it would have removed at exit (AutoGraph's `__autograph_generated_file*`)."""
    with tempfile.TemporaryDirectory(prefix="ttq-tmp-") as temp:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", TMPDIR=temp)
        return _timed_run(cmd, pattern, target, max_seconds, env)


def _timed_run(cmd, pattern, target, max_seconds, env) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=common.ROOT, env=env)
    timed_out = threading.Event()
    timer = threading.Timer(max_seconds, lambda: (timed_out.set(), proc.kill()))
    timer.start()
    curve, reached, tail = [], None, []
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-20:]
            match = pattern.search(line)
            if not match:
                continue
            seconds = time.perf_counter() - start
            curve.append((round(seconds, 3), int(match.group(1)), float(match.group(2))))
            if float(match.group(2)) <= target:
                reached = seconds
                proc.kill()
                break
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    if not curve and not timed_out.is_set():
        # It could not run (missing data, a batch that does not divide over the GPUs): the
        # benchmark stops with its line, before a report of failures replaces the last one.
        errors = [line.strip() for line in tail if "error" in line.lower()]
        last = (errors or [text.strip() for text in tail] or ["no output"])[-1]
        raise common.Failed(f"{os.path.basename(cmd[1])} exited with code {proc.returncode} "
                            "before its first evaluation: "
                            + re.sub(r"^\S+: error: ", "", last), proc.returncode)
    return {"seconds": reached, "final_bce": curve[-1][2] if curve else None, "curve": curve}


def run_ours(train_split, eval_split, seed) -> dict:
    model_dir = tempfile.mkdtemp(prefix="ttq-")
    try:
        cmd = [sys.executable, os.path.join(common.ROOT, "train.py"), f"--flagfile={FLAGS.recipe}",
               f"--dataset={FLAGS.dataset}", f"--train_split={train_split}",
               f"--eval_split={eval_split}", f"--seed={seed}", f"--model_dir={model_dir}",
               *([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else []), *FLAGS.extra_flags]
        return timed_run(cmd, OURS, FLAGS.target, FLAGS.max_seconds)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def run_tutorial(train_split, eval_split, seed) -> dict:
    cmd = [sys.executable, os.path.join(common.ROOT, "benchmarks", "tutorial_recipe.py"),
           f"--dataset={FLAGS.dataset}", f"--train_split={train_split}",
           f"--eval_split={eval_split}", f"--seed={seed}", f"--target={FLAGS.target}",
           *([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else [])]
    return timed_run(cmd, TUTORIAL, FLAGS.target, FLAGS.max_seconds)


def summarize(runs: list[dict]) -> dict:
    times = [r["seconds"] for r in runs]
    reached = [t for t in times if t is not None]
    return {"reached": len(reached), "runs": len(runs),
            "median": statistics.median(reached) if reached else None,
            "worst": max(reached) if len(reached) == len(runs) else None,
            "best": min(reached) if reached else None,
            "worst_final_bce": max((r["final_bce"] for r in runs if r["final_bce"] is not None),
                                   default=None)}


def split_pair(pair: str) -> tuple[str, str]:
    """'test[:8000]:test[8000:]' -> ('test[:8000]', 'test[8000:]'): the colon outside brackets."""
    depth = 0
    for i, char in enumerate(pair):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == ":" and depth == 0:
            return pair[:i], pair[i + 1:]
    raise app.UsageError(f"--splits: {pair!r} is not TRAIN:EVAL, e.g. test[:8000]:test[8000:]")


def recipe_lines(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip().startswith("--")]


def main(argv):
    del argv
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runners = {"tapeloop": run_ours, "tutorial": run_tutorial}
    unknown = set(FLAGS.contenders) - set(runners)
    if unknown:
        raise app.UsageError(f"--contenders: unknown {sorted(unknown)}; use tapeloop, tutorial")
    splits = [split_pair(pair) for pair in FLAGS.splits]
    context = common.machine_context(with_peaks=False)
    results = {}
    for index, (train_split, eval_split) in enumerate(splits):
        key = f"{train_split} -> {eval_split}"
        role = "tuning" if index == 0 else "held_out"
        runs = {name: [] for name in FLAGS.contenders}
        for seed in range(FLAGS.seeds):
            for name in FLAGS.contenders:
                run = runners[name](train_split, eval_split, seed)
                runs[name].append(run)
                print(f"{role} {key} | {name} seed {seed} | "
                      + (f"{run['seconds']:.1f} s" if run["seconds"] else "not reached")
                      + (f" | bce {run['final_bce']:.4f}" if run["curve"] else
                         " | no evaluation in --max_seconds"), flush=True)
        entry = {"role": role, "train_split": train_split, "eval_split": eval_split,
                 "runs": runs, "summary": {n: summarize(r) for n, r in runs.items()}}
        if set(FLAGS.contenders) == set(runners):
            ours, theirs = entry["summary"]["tapeloop"], entry["summary"]["tutorial"]
            if ours["median"] and theirs["median"]:
                entry["median_fraction"] = ours["median"] / theirs["median"]
            if ours["worst"] and theirs["median"]:
                entry["worst_fraction"] = ours["worst"] / theirs["median"]
        results[key] = entry

    payload = {"context": context, "config": {
        "dataset": FLAGS.dataset, "target_bce": FLAGS.target, "seeds": FLAGS.seeds,
        "recipe": os.path.relpath(FLAGS.recipe, common.ROOT),
        "recipe_flags": recipe_lines(FLAGS.recipe) + FLAGS.extra_flags,
        "tutorial": NAMES["tutorial"], "max_seconds": FLAGS.max_seconds},
        "results": results}

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.2), squeeze=False)
    colours = {"tapeloop": "tab:orange", "tutorial": "tab:blue"}
    for ax, entry in zip(axes[0], results.values()):
        for name, runs in entry["runs"].items():
            for i, run in enumerate(runs):
                seconds = [p[0] for p in run["curve"]]
                losses = [p[2] for p in run["curve"]]
                ax.plot(seconds, losses, color=colours[name], alpha=0.75, linewidth=1,
                        marker="o", markersize=2, label=NAMES[name] if i == 0 else None)
        ax.axhline(FLAGS.target, color="gray", linestyle="--", label=f"target {FLAGS.target}")
        ax.set_xlabel("seconds since the process started (everything included)")
        ax.set_ylabel("held-out BCE")
        ax.set_ylim(FLAGS.target * 0.9, 0.3)
        ax.set_title(f"{entry['role']}: train {entry['train_split']}, evaluate "
                     f"{entry['eval_split']} ({FLAGS.seeds} seeds each)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    png = os.path.join(FLAGS.output_dir, "time_to_quality.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)

    def fmt(s):
        return f"{s:.1f}" if s is not None else "not reached"

    lines = ["# Time to quality\n", common.context_markdown(context),
             f"Seed model on {FLAGS.dataset}, held-out BCE <= {FLAGS.target}, seeds 0-"
             f"{FLAGS.seeds - 1}. Seconds from process launch to the log line that reports the "
             "target (imports, data, compilation and evaluation included).\n",
             "tapeloop's recipe: `" + " ".join(payload["config"]["recipe_flags"]) + "`\n",
             "| split | recipe | median s | worst s | best s | reached | every seed's s |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for key, entry in results.items():
        for name, runs in entry["runs"].items():
            s = entry["summary"][name]
            lines.append(f"| {entry['role']}: {key} | {NAMES[name]} | {fmt(s['median'])} | "
                         f"{fmt(s['worst'])} | {fmt(s['best'])} | {s['reached']}/{s['runs']} | "
                         + ", ".join(fmt(r["seconds"]) for r in runs) + " |")
    lines.append("")
    for key, entry in results.items():
        if "median_fraction" in entry:
            lines.append(f"- {entry['role']} ({key}): tapeloop's median is "
                         f"{entry['median_fraction']:.2f} of the tutorial's median (target <= "
                         "0.33)" + (f"; its worst seed {entry['worst_fraction']:.2f} (target <= "
                                    "0.5)" if "worst_fraction" in entry else
                                    "; not every seed reached the target") + ".")
    lines.append(f"\n![curves]({os.path.basename(png)})")
    common.write_report(FLAGS.output_dir, "time_to_quality", payload, lines)
    print(f"wrote {png}")


if __name__ == "__main__":
    common.run(main)
