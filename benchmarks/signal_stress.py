#!/usr/bin/env python3
"""Ctrl-C at random moments of `--mode=eval`'s start: how each process ends.

    python benchmarks/signal_stress.py [--runs=60] [--checkout=PATH] [--python] [--name=NAME]

Trains a small run once (fontdigits, 20 steps, evaluated on its test split), then
`--runs` times: copies it, starts `train.py --mode=eval` on the copy from `--checkout`
(default: this one; a `git worktree` of an older commit measures that commit), waits for
its "restored" log line, sleeps a random 0-200 ms (restoring, building the eval dataset,
tracing and running the eval step) and sends SIGINT, with `--busy` CPU-bound processes
running beside (on an idle machine the races are rarer: CI's two test workers load it).
Each process ends one of four ways: the one line and code 130 (asked for), an abort
(code -6), the signal lost (the evaluation ran to the end, code 0), or something else.
Also counts the copies whose checkpoints and config are unchanged and whose lock was
released (an empty .lock). Writes results/NAME.{json,md}.

With `--python`, each process is a notebook's cells instead: `core.run(Config(mode="eval",
...))` from Python, the KeyboardInterrupt caught, then a second evaluation in the same
process (does TensorFlow still work?). It ends one of these ways: KeyboardInterrupt at a
safe point of the run (`core.signals.interruption_point`), KeyboardInterrupt raised
inside TensorFlow or Keras, KeyboardInterrupt elsewhere, an abort, the signal lost, or
something else; and the second evaluation ran or not.

Not a speed benchmark: a reliability count, kept here because the README quotes it.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 60, "Processes to interrupt.", lower_bound=1)
flags.DEFINE_string("checkout", common.ROOT, "The tapeloop checkout whose train.py runs.")
flags.DEFINE_integer("seed", 0, "Seed of the random delays.")
flags.DEFINE_integer("busy", 2, "CPU-bound processes run beside, as CI's test workers do: "
                     "on an idle machine the races below are rarer.", lower_bound=0)
flags.DEFINE_bool("python", False, "Interrupt core.run called from Python (a notebook), "
                  "not train.py.")
flags.DEFINE_string("name", None, "Report name (default: signal_stress, with --python "
                    "signal_stress_python).")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")

DELAYS_MS = (0, 0, 1, 2, 5, 10, 20, 50, 100, 200)
OUTCOMES = ("one line, code 130", "aborted (SIGABRT)", "signal lost (eval ran to the end)",
            "other")
PYTHON_OUTCOMES = ("KeyboardInterrupt at a safe point", "KeyboardInterrupt inside TensorFlow "
                   "or Keras", "KeyboardInterrupt elsewhere", "aborted (SIGABRT)",
                   "signal lost (eval ran to the end)", "other")

# A notebook's two cells: an evaluation (interrupted), then another in the same process.
NOTEBOOK = """
import sys, traceback
sys.path.insert(0, sys.argv[1])
from absl import logging
logging.set_verbosity(logging.INFO)
import core
from core.config import Config
try:
    core.run(Config(mode="eval", model_dir=sys.argv[2], eval_batch_size=8))
    print("OUTCOME finished", flush=True)
except KeyboardInterrupt:
    last = traceback.extract_tb(sys.exc_info()[2])[-1]
    print("OUTCOME interrupted", last.name, last.filename, flush=True)
result = core.run(Config(mode="eval", model_dir=sys.argv[2], eval_split="test[:64]"))
print("AGAIN", result["step"], flush=True)
"""


def _train(checkout: str, *flags_: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.join(checkout, "train.py"), *flags_], cwd=checkout,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _checkpoint_files(folder: str) -> dict:
    """The checkpoints, their state file and config.json: name -> bytes."""
    names = [f for f in os.listdir(folder)
             if f.startswith("ckpt-") or f in ("checkpoint", "config.json")]
    return {f: open(os.path.join(folder, f), "rb").read() for f in names}


def _notebook(checkout: str, model_dir: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", NOTEBOOK, checkout, model_dir], cwd=checkout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _python_outcome(proc: subprocess.Popen, out: str) -> tuple[str, bool]:
    """(the `--python` outcome, whether the second evaluation ran)."""
    again = "\nAGAIN " in out
    found = [x.split() for x in out.splitlines() if x.startswith("OUTCOME ")]
    if proc.returncode == -signal.SIGABRT:
        return PYTHON_OUTCOMES[3], again
    if not found:
        return PYTHON_OUTCOMES[5], again
    if found[0][1] == "finished":
        return PYTHON_OUTCOMES[4], again
    name, filename = found[0][2], found[0][3] if len(found[0]) > 3 else ""
    if name == "interruption_point":
        return PYTHON_OUTCOMES[0], again
    if "/tensorflow/" in filename or "/keras/" in filename:
        return PYTHON_OUTCOMES[1], again
    return PYTHON_OUTCOMES[2], again


def _interrupt_evals(counts: collections.Counter, examples: dict) -> tuple[int, int]:
    """Runs the processes; returns (checkpoints unchanged, locks released) counts; with
    --python, (checkpoints unchanged, second evaluations that ran)."""
    rng = random.Random(FLAGS.seed)
    unchanged = released = 0
    with tempfile.TemporaryDirectory() as scratch:
        trained = os.path.join(scratch, "trained")
        proc = _train(common.ROOT, f"--model_dir={trained}", "--train_steps=20",
                      "--eval_every=20")  # fontdigits, evaluated on its own test split
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
        before = _checkpoint_files(trained)
        for i in range(FLAGS.runs):
            run = os.path.join(scratch, f"run{i}")
            shutil.copytree(trained, run)
            if FLAGS.python:
                proc = _notebook(FLAGS.checkout, run)
                head = []
                for line in proc.stdout:
                    head.append(line)
                    if "restored" in line:
                        break
            else:
                proc = _train(FLAGS.checkout, "--mode=eval", f"--model_dir={run}",
                              "--batch_size=8")
                for line in proc.stderr:
                    if "restored" in line:
                        break
            delay = rng.choice(DELAYS_MS)
            time.sleep(delay / 1000)
            proc.send_signal(signal.SIGINT)
            if FLAGS.python:
                out, _ = proc.communicate(timeout=300)
                out = "".join(head) + out
                outcome, again = _python_outcome(proc, out)
                counts[outcome] += 1
                if outcome != PYTHON_OUTCOMES[0]:
                    lines = [x for x in out.splitlines() if "Error" in x or "OUTCOME" in x
                             or x.lstrip().startswith("File ")]
                    examples.setdefault(outcome, "\n".join(lines[-10:]))
                unchanged += _checkpoint_files(run) == before
                released += again  # with --python: the second evaluation ran
                print(f"{i}: {delay} ms: {outcome}, evaluated again: {again} "
                      f"(code {proc.returncode})", flush=True)
                shutil.rmtree(run)
                continue
            _, err = proc.communicate(timeout=300)
            last = (err.strip().splitlines() or [""])[-1]
            if proc.returncode == 130 and "Traceback" not in err and "stopped" in last:
                outcome = OUTCOMES[0]
            elif proc.returncode == -signal.SIGABRT:
                outcome = OUTCOMES[1]
            elif proc.returncode == 0:
                outcome = OUTCOMES[2]
            else:
                outcome = OUTCOMES[3]
            counts[outcome] += 1
            if outcome != OUTCOMES[0]:
                lines = [x for x in err.splitlines() if "Error" in x or "Exception" in x
                         or x.lstrip().startswith("File ") or x.startswith("KeyboardInterrupt")]
                examples.setdefault(outcome, "\n".join(lines[-10:]))
            unchanged += _checkpoint_files(run) == before
            with open(os.path.join(run, ".lock")) as f:
                released += f.read() == ""
            print(f"{i}: {delay} ms: {outcome} (code {proc.returncode})", flush=True)
            shutil.rmtree(run)
    return unchanged, released


def main(argv):
    del argv
    commit = subprocess.run(["git", "-C", FLAGS.checkout, "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()  # what runs
    counts, examples = collections.Counter(), {}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(FLAGS.busy)]
    try:
        unchanged, released = _interrupt_evals(counts, examples)
    finally:
        for proc in busy:
            proc.kill()
    outcomes = PYTHON_OUTCOMES if FLAGS.python else OUTCOMES
    context = common.machine_context(with_peaks=False)
    payload = {"context": context, "runs": FLAGS.runs, "checkout_commit": commit,
               "delays_ms": DELAYS_MS, "seed": FLAGS.seed, "busy": FLAGS.busy,
               "python": FLAGS.python, "outcomes": {o: counts[o] for o in outcomes},
               "checkpoints_unchanged": unchanged,
               ("evaluated_again" if FLAGS.python else "lock_released"): released,
               "examples": examples}
    what = ("`core.run(Config(mode=\"eval\"))` from Python, then a second evaluation in the "
            "same process" if FLAGS.python else "`--mode=eval`'s start")
    lines = [f"# Ctrl-C at random moments of {what} ({commit})\n",
             common.context_markdown(context),
             f"{FLAGS.runs} processes, SIGINT 0-200 ms after the checkpoint was restored, "
             f"{FLAGS.busy} busy processes beside (`python benchmarks/signal_stress.py "
             f"--runs={FLAGS.runs}" + (" --python" if FLAGS.python else "")
             + (" --checkout=PATH`, PATH a checkout of the commit above)."
                if os.path.abspath(FLAGS.checkout) != common.ROOT else "`).") + "\n",
             "| outcome | processes |", "| --- | ---: |"]
    lines += [f"| {o} | {counts[o]} |" for o in outcomes]
    lines += ["", f"Checkpoints and config unchanged: {unchanged} of {FLAGS.runs}; " + (
        f"the second evaluation in the same process ran: {released} of {FLAGS.runs}."
        if FLAGS.python else f"lock released (empty .lock): {released} of {FLAGS.runs}.")]
    for outcome, text in examples.items():
        lines += ["", f"First {outcome}:", "```", text, "```"]
    name = FLAGS.name or ("signal_stress_python" if FLAGS.python else "signal_stress")
    common.write_report(FLAGS.output_dir, name, payload, lines)


if __name__ == "__main__":
    common.run(main)
