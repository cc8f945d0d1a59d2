#!/usr/bin/env python3
"""What an evaluation costs, a call per batch against the compiled eval loop.

    python benchmarks/eval_loop.py

`Trainer.evaluate` makes its first `EVAL_BATCHES_PER_CALL` (64) batches one call each and
the rest that many a call, in a compiled loop. The variant `per_batch` makes every batch a
call of its own (the constant set past the split's batches), as evaluation did before.
Both evaluate the same trained-from-scratch model on the same split, in one process, in
alternating rounds; each round's first evaluation (tracing, the loop's included) is
reported apart from the later ones. Writes results/eval_loop.{json,md}.
"""

from __future__ import annotations

import os
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
flags.DEFINE_integer("rounds", 2, "Rounds of both variants, alternating (a fresh trainer "
                     "each: its first evaluation traces).", lower_bound=1)
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
    default = trainer.EVAL_BATCHES_PER_CALL

    def timings(batch_size, per_call):
        """(first evaluation's seconds, later ones', the metrics) of a fresh run."""
        trainer.EVAL_BATCHES_PER_CALL = per_call
        with tempfile.TemporaryDirectory() as folder:
            run = Run(Config(model=FLAGS.model, dataset=FLAGS.dataset,
                             eval_split=FLAGS.eval_split, eval_batch_size=batch_size,
                             model_dir=os.path.join(folder, "run")))
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
                trainer.EVAL_BATCHES_PER_CALL = default
        return times[0], times[1:], metrics, examples

    variants = {"per_batch": 2**62, "loop": default}
    rows = []
    for batch_size in batch_sizes:
        first = {name: [] for name in variants}
        later = {name: [] for name in variants}
        for _ in range(FLAGS.rounds):
            bce = {}
            for name, per_call in variants.items():
                t0, rest, metrics, examples = timings(batch_size, per_call)
                first[name].append(t0)
                later[name].extend(rest)
                bce[name] = metrics["bce"]
            if abs(bce["loop"] - bce["per_batch"]) > 1e-5:  # the same model and split
                raise common.Failed(f"the loop's bce {bce['loop']} is not the per-batch "
                                    f"calls' {bce['per_batch']}")
        batches = -(-examples // batch_size)

        def stats(values):
            return statistics.median(values), min(values), max(values)

        rows.append({"eval_batch_size": batch_size, "batches": batches, "examples": examples,
                     **{f"{name}_first_s": stats(first[name]) for name in variants},
                     **{f"{name}_later_s": stats(later[name]) for name in variants}})
    context = common.machine_context(with_peaks=False)
    payload = {"context": context, "model": FLAGS.model, "dataset": FLAGS.dataset,
               "eval_split": FLAGS.eval_split, "eval_batches_per_call": default, "rows": rows}
    lines = ["# Evaluation: a call per batch against the compiled eval loop\n",
             common.context_markdown(context),
             f"`{FLAGS.model}` on {FLAGS.dataset} {FLAGS.eval_split}; the loop takes the "
             f"batches past the first {default}, {default} a call. Seconds per evaluation: "
             f"median (range) of {FLAGS.rounds} fresh runs for the first evaluation, of "
             f"{FLAGS.rounds * FLAGS.repeats} for the later ones; rounds alternate the "
             "variants (`python benchmarks/eval_loop.py`).\n",
             "| eval batch | batches | first: per batch | first: loop | later: per batch | "
             "later: loop | later, per batch / loop |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        cells = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in (
            row["per_batch_first_s"], row["loop_first_s"], row["per_batch_later_s"],
            row["loop_later_s"])]
        ratio = row["per_batch_later_s"][0] / row["loop_later_s"][0]
        lines.append(f"| {row['eval_batch_size']} | {row['batches']} | " + " | ".join(cells)
                     + f" | {ratio:.2f}x |")
    if any(row["batches"] <= default for row in rows):
        lines += ["", f"A split of {default} batches or fewer takes the same path in both "
                  "variants (a call per batch): their difference there is the machine's noise."]
    common.write_report(FLAGS.output_dir, "eval_loop", payload, lines)


if __name__ == "__main__":
    common.run(main)
