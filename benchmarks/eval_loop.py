#!/usr/bin/env python3
"""What an evaluation costs, a call per batch against the compiled eval loop.

    python benchmarks/eval_loop.py

`Trainer.evaluate` makes each batch a compiled call of its own until the trainer has made
`EVAL_CALLS_BEFORE_LOOP` such calls, then takes the batches past each evaluation's first
through a compiled loop, `EVAL_BATCHES_PER_CALL` a call. The variant `per_batch` never takes
the loop (the constant set past any run's calls); `loop` takes it from the first evaluation
(the constant set to 0). Both evaluate the same trained-from-scratch model on the same split,
in one process, in alternating rounds; each round's first evaluation (tracing, the loop's
included) is reported apart from the later ones. From the medians: what the loop's trace
adds to a first evaluation, what it saves a batch later, and so after how many calls a
batch it pays, the figure `EVAL_CALLS_BEFORE_LOOP` is set from. Writes
results/eval_loop.{json,md}.

    python benchmarks/eval_loop.py --workers=2 --eval_split='test[:1000]' --eval_batch_sizes=2

The same between two worker processes of one cluster on this machine, which make the
collective calls of MultiWorkerMirroredStrategy (`EVAL_CALLS_BEFORE_LOOP_MULTI_WORKER`);
writes results/eval_loop_2_workers.{json,md}.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "seed", "The model evaluated.")
flags.DEFINE_string("dataset", "fontdigits", "The dataset (the embedded one by default).")
flags.DEFINE_string("eval_split", "test", "The split evaluated.")
flags.DEFINE_list("eval_batch_sizes", ["8", "256"], "Eval batch sizes, each timed.")
flags.DEFINE_integer("repeats", 3, "Later evaluations timed per variant and round.",
                     lower_bound=1)
flags.DEFINE_integer("rounds", 3, "Rounds of both variants, alternating (a fresh trainer "
                     "each: its first evaluation traces).", lower_bound=1)
flags.DEFINE_integer("workers", 1, "Processes that evaluate together: 2 is a cluster of two "
                     "on this machine (MultiWorkerMirroredStrategy, one replica each), "
                     "started anew for each variant and round.", lower_bound=1, upper_bound=2)
flags.DEFINE_string("worker_of", None, "Internal: the batch size, calls before the loop and "
                    "model dir (shared) this process times as a worker of --workers=2.")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")


def main(argv):
    del argv
    import statistics

    from core import data, trainer
    from core.config import Config
    from core.runner import Run

    batch_sizes = [int(b) for b in FLAGS.eval_batch_sizes]
    if min(batch_sizes) < 1:
        raise common.Failed("--eval_batch_sizes must be positive integers", 2)
    multi_worker = FLAGS.workers > 1 or FLAGS.worker_of
    default = (trainer.EVAL_CALLS_BEFORE_LOOP_MULTI_WORKER if multi_worker
               else trainer.EVAL_CALLS_BEFORE_LOOP)
    constant = ("EVAL_CALLS_BEFORE_LOOP_MULTI_WORKER" if multi_worker
                else "EVAL_CALLS_BEFORE_LOOP")

    def timings(batch_size, calls_before_loop, model_dir=None):
        """(first evaluation's seconds, later ones', the metrics) of a fresh run."""
        setattr(trainer, constant, calls_before_loop)
        with tempfile.TemporaryDirectory() as folder:
            run = Run(Config(model=FLAGS.model, dataset=FLAGS.dataset,
                             eval_split=FLAGS.eval_split, eval_batch_size=batch_size,
                             strategy="multi_worker" if multi_worker else "default",
                             model_dir=model_dir or os.path.join(folder, "run")))
            try:
                cfg = run.config
                dist = run.strategy.distribute_datasets_from_function(
                    lambda ctx: data.eval_dataset(run.eval_split, cfg.eval_batch, ctx))
                times = []
                for _ in range(1 + FLAGS.repeats):
                    start = time.perf_counter()
                    metrics = run.trainer.evaluate(dist)
                    times.append(time.perf_counter() - start)
                examples = run.eval_split.num_examples
            finally:
                run.close()
                setattr(trainer, constant, default)
        return times[0], times[1:], metrics, examples

    if FLAGS.worker_of:
        batch_size, calls_before_loop, model_dir = FLAGS.worker_of.split(",", 2)
        print("TIMINGS", json.dumps(timings(int(batch_size), int(calls_before_loop),
                                            model_dir)))
        return

    def in_workers(batch_size, calls_before_loop):
        """`timings` of two workers of one cluster, started for it: the chief's."""
        sockets = [socket.socket() for _ in range(FLAGS.workers)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        workers = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
        for s in sockets:
            s.close()
        folder = tempfile.mkdtemp()
        logs = [(open(os.path.join(folder, f"{i}.out"), "w+"),
                 open(os.path.join(folder, f"{i}.err"), "w+")) for i in range(FLAGS.workers)]
        procs = [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--model={FLAGS.model}",
             f"--dataset={FLAGS.dataset}", f"--eval_split={FLAGS.eval_split}",
             f"--repeats={FLAGS.repeats}",
             f"--worker_of={batch_size},{calls_before_loop},{folder}/run"],
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
                {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})),
            stdout=out, stderr=err, text=True)
            for i, (out, err) in enumerate(logs)]
        try:
            # A worker that fails before the other joins would leave it waiting for ever.
            while any(proc.poll() is None for proc in procs):
                if any(proc.poll() for proc in procs):
                    break
                time.sleep(0.5)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        outs = []
        for out, err in logs:
            out.seek(0), err.seek(0)
            outs.append((out.read(), err.read()))
            out.close(), err.close()
        shutil.rmtree(folder, ignore_errors=True)
        for i, (proc, (_, err)) in enumerate(zip(procs, outs)):
            if proc.returncode:  # its own one-line error, if it printed one
                mine = [line for line in err.splitlines() if line.startswith("eval_loop.py: error: ")]
                reason = (mine[-1][len("eval_loop.py: error: "):] if mine
                          else "the end of its log:\n" + err[-3000:])
                raise common.Failed(f"worker {i} failed (exit code {proc.returncode}): "
                                    f"{reason}", proc.returncode)
        line, = [line for line in outs[0][0].splitlines() if line.startswith("TIMINGS ")]
        return json.loads(line[len("TIMINGS "):])

    measure = in_workers if FLAGS.workers > 1 else timings

    variants = {"per_batch": 2**62, "loop": 0}
    rows = []
    for batch_size in batch_sizes:
        first = {name: [] for name in variants}
        later = {name: [] for name in variants}
        for _ in range(FLAGS.rounds):
            bce = {}
            for name, calls_before_loop in variants.items():
                t0, rest, metrics, examples = measure(batch_size, calls_before_loop)
                first[name].append(t0)
                later[name].extend(rest)
                bce[name] = metrics["bce"]
            if abs(bce["loop"] - bce["per_batch"]) > 1e-5:  # the same model and split
                raise common.Failed(f"the loop's bce {bce['loop']} is not the per-batch "
                                    f"calls' {bce['per_batch']}")
        batches = -(-examples // batch_size)

        def stats(values):
            return statistics.median(values), min(values), max(values)

        row = {"eval_batch_size": batch_size, "batches": batches, "examples": examples,
               **{f"{name}_first_s": stats(first[name]) for name in variants},
               **{f"{name}_later_s": stats(later[name]) for name in variants}}
        # The loop's trace: what it adds to a first evaluation beyond the per-batch calls'
        # own first-evaluation cost; its saving: a later evaluation's, per batch it takes.
        trace = ((row["loop_first_s"][0] - row["loop_later_s"][0])
                 - (row["per_batch_first_s"][0] - row["per_batch_later_s"][0]))
        saving = (row["per_batch_later_s"][0] - row["loop_later_s"][0]) / max(batches - 1, 1)
        row["loop_trace_s"], row["saving_per_batch_ms"] = trace, saving * 1e3
        row["pays_after_calls"] = trace / saving if saving > 0 and trace > 0 else None
        rows.append(row)
    context = common.machine_context(with_peaks=False)
    per_call = trainer.EVAL_BATCHES_PER_CALL
    command = "python benchmarks/eval_loop.py" + (f" --workers={FLAGS.workers}"
                                                  if FLAGS.workers > 1 else "")
    where = (f"{FLAGS.workers} workers of one cluster on this machine (one replica each)"
             if FLAGS.workers > 1 else "one process")
    payload = {"context": context, "model": FLAGS.model, "dataset": FLAGS.dataset,
               "eval_split": FLAGS.eval_split, "workers": FLAGS.workers,
               "eval_calls_before_loop": default,
               "eval_batches_per_call": per_call, "rows": rows}
    lines = ["# Evaluation: a call per batch against the compiled eval loop\n",
             common.context_markdown(context),
             f"`{FLAGS.model}` on {FLAGS.dataset} {FLAGS.eval_split}, {where}. "
             "`per_batch`: every batch "
             f"a call; `loop`: the batches past an evaluation's first in the compiled loop, "
             f"{per_call} a call, from the first evaluation. Seconds per evaluation: "
             f"median (range) of {FLAGS.rounds} fresh runs for the first evaluation, of "
             f"{FLAGS.rounds * FLAGS.repeats} for the later ones; rounds alternate the "
             f"variants (`{command}`).\n",
             "| eval batch | batches | first: per batch | first: loop | later: per batch | "
             "later: loop | later, per batch / loop | the loop's trace | saved a batch | "
             "pays after |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        cells = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in (
            row["per_batch_first_s"], row["loop_first_s"], row["per_batch_later_s"],
            row["loop_later_s"])]
        ratio = row["per_batch_later_s"][0] / row["loop_later_s"][0]
        pays = row["pays_after_calls"]
        lines.append(f"| {row['eval_batch_size']} | {row['batches']} | " + " | ".join(cells)
                     + f" | {ratio:.2f}x | {row['loop_trace_s']:.2f} s | "
                     f"{row['saving_per_batch_ms']:.2f} ms | "
                     + (f"{pays:,.0f} calls |" if pays else "never (no saving measured) |"))
    lines += ["", "The loop's trace is the first evaluation's extra time beyond the per-batch "
              "calls' own first-evaluation extra; a batch's saving is the later evaluations' "
              "difference over the batches the loop takes; the loop pays after their ratio in "
              f"calls. `Trainer.evaluate` takes it after {default:,} calls (`{constant}`): a "
              "run never pays much more than twice the cheaper way's cost, whichever that "
              "turns out to be."]
    name = "eval_loop" + (f"_{FLAGS.workers}_workers" if FLAGS.workers > 1 else "")
    common.write_report(FLAGS.output_dir, name, payload, lines)


if __name__ == "__main__":
    common.run(main)
