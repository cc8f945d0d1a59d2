#!/usr/bin/env python3
"""Where a training step's time goes, op by op, from the TensorFlow profiler.

    python benchmarks/op_profile.py                                    # TensorFlow's threads
    python benchmarks/op_profile.py --num_intra_threads=1 --num_inter_threads=2 --batch_shards=2

Traces `--steps` steps of tapeloop's Trainer (on-device data, `--steps` steps in
one compiled call) with `tf.profiler.experimental`, then reads the trace's
XPlane: for every op type, how often it runs per step and its summed duration
per step (over all threads), how long the executor's threads were busy
(running ops plus scheduling them) against the wall time, and for how much of
the wall time 0, 1, 2, ... ops ran at once (with one thread per core, the time
with fewer ops than cores is idle cores; the ops that ran alone are listed). Writes
results/op_profile.{json,md}; the numbers behind benchmarks/NOTES.md.
"""

from __future__ import annotations

import collections
import glob
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "seed", "Registered model.")
flags.DEFINE_string("dataset", "fontdigits", "Dataset of the training split.")
flags.DEFINE_string("data_dir", None, "For mnist/fashion_mnist.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("batch_shards", 1, "Trainer batch_shards.", lower_bound=1)
flags.DEFINE_integer("num_intra_threads", 0, "Threads per op (0: TensorFlow's choice).", lower_bound=0)
flags.DEFINE_integer("num_inter_threads", 0, "Ops at once (0: TensorFlow's choice).", lower_bound=0)
flags.DEFINE_string("precision", "float32", "float32 or mixed_bfloat16.")
flags.DEFINE_integer("steps", 16, "Traced steps (one compiled call; longer traces lose small "
                     "ops' events).", lower_bound=1)
flags.DEFINE_list("without", [], "Names of `fast_forms.Forms` fields turned off (what one "
                  "form changes in the profile).")
flags.DEFINE_integer("top", 25, "Rows of each Markdown table.", lower_bound=1)
flags.DEFINE_string("report_name", "op_profile", "Writes REPORT_NAME.{json,md}.")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"), "Reports go here.")


def read_trace(logdir: str) -> dict:
    """Per op type: (count, picoseconds); per compute thread: busy picoseconds; first/last ns."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    counts, durations, busy = collections.Counter(), collections.Counter(), collections.Counter()
    nodes = collections.Counter()
    first, last = None, None
    events = []  # (start ns, end ns, node (op type)) of every op, all threads
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # TensorFlow's executor threads
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                start = line.timestamp_ns + event.offset_ps / 1e3
                if name == "ExecutorState::Process":  # a thread running (and scheduling) ops
                    busy[line.name] += event.duration_ps
                elif ":" in name and "::" not in name:  # "node_name:OpType", not "Class::method"
                    node, op = name.rsplit(":", 1)
                    counts[op] += 1
                    durations[op] += event.duration_ps
                    nodes[f"{_short(node)} ({op})"] += event.duration_ps
                    first = start if first is None else min(first, start)
                    end = start + event.duration_ps / 1e3
                    last = end if last is None else max(last, end)
                    events.append((start, end, f"{_short(node)} ({op})"))
    return {"counts": counts, "durations": durations, "nodes": nodes, "busy": busy,
            "span_ns": (last or 0) - (first or 0), **_concurrency(events)}


def _concurrency(events: list) -> dict:
    """How many ops ran at once, over the traced span: nanoseconds with 0, 1, 2, ... ops
    running, and per node the nanoseconds it ran while no other op did (where a core
    idled, if there are as many executor threads as cores)."""
    edges = sorted([(start, 1, i) for i, (start, _, _) in enumerate(events)]
                   + [(end, -1, i) for i, (_, end, _) in enumerate(events)])
    at_once, alone = collections.Counter(), collections.Counter()
    running, previous = set(), None
    for t, change, i in edges:
        if previous is not None:
            at_once[len(running)] += t - previous
            if len(running) == 1:
                alone[events[next(iter(running))][2]] += t - previous
        previous = t
        if change > 0:
            running.add(i)
        else:
            running.discard(i)
    return {"ops_at_once_ns": at_once, "alone_ns": alone}


def _short(node: str) -> str:
    """'while/body/_1/gradient_tape/while/seed_1/encoder_1/down0_1/conv_1/convolution/X'
    -> 'gradient_tape/encoder/down0/conv/convolution/X'."""
    import re

    parts = [re.sub(r"_\d+$", "", p) for p in node.split("/")]
    return "/".join(p for p in parts if p not in ("while", "body", "", FLAGS.model))


def main(argv):
    del argv
    import tensorflow as tf

    from core import data, distribute
    from core.trainer import Trainer

    distribute.set_cpu_threads(FLAGS.num_intra_threads, FLAGS.num_inter_threads)
    images = data.load_split("train", FLAGS.dataset, FLAGS.data_dir).images
    strategy = tf.distribute.get_strategy()
    tf.keras.utils.set_random_seed(0)
    model = common.build_model(FLAGS.model, images.shape[1:], FLAGS.precision,
                               without=tuple(FLAGS.without))
    trainer = Trainer(model, strategy, FLAGS.batch_size, 1e-3, FLAGS.precision,
                      device_data=data.DeviceData(images, FLAGS.batch_size,
                                                  strategy.num_replicas_in_sync, 0),
                      batch_shards=FLAGS.batch_shards)
    for _ in range(3):  # compile, then warm up
        trainer.train_loop(None, FLAGS.steps)
    start = time.perf_counter()
    trainer.train_loop(None, FLAGS.steps)
    untraced_ms = 1e3 * (time.perf_counter() - start) / FLAGS.steps
    logdir = tempfile.mkdtemp(prefix="op_profile-")
    try:
        tf.profiler.experimental.start(
            logdir, options=tf.profiler.experimental.ProfilerOptions(host_tracer_level=3))
        trainer.train_loop(None, FLAGS.steps)
        tf.profiler.experimental.stop()
        trace = read_trace(logdir)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)

    n = FLAGS.steps
    ops = {op: {"per_step": trace["counts"][op] / n, "ms_per_step": trace["durations"][op] / 1e9 / n}
           for op in trace["counts"]}
    op_ms = sum(o["ms_per_step"] for o in ops.values())
    busy_ms = {thread: ps / 1e9 / n for thread, ps in trace["busy"].items()}
    summary = {
        "wall_ms_per_step_traced": trace["span_ns"] / 1e6 / n,
        "wall_ms_per_step_untraced": untraced_ms,
        "op_ms_per_step": op_ms,
        "ops_per_step": sum(o["per_step"] for o in ops.values()),
        "executor_threads": len(busy_ms),
        "busy_ms_per_step": sum(busy_ms.values()),
        # Share of the traced span during which k ops ran at once (k = 0, 1, 2, ...).
        "ops_at_once_share": {k: ns / max(trace["span_ns"], 1)
                              for k, ns in sorted(trace["ops_at_once_ns"].items())},
    }
    payload = {"context": common.machine_context(with_peaks=False), "config": {
        "model": FLAGS.model, "batch_size": FLAGS.batch_size, "batch_shards": FLAGS.batch_shards,
        "num_intra_threads": FLAGS.num_intra_threads, "num_inter_threads": FLAGS.num_inter_threads,
        "precision": FLAGS.precision, "steps": n}, "summary": summary, "ops": ops}
    lines = ["# Op profile of one training step\n", common.context_markdown(payload["context"]),
             f"Model `{FLAGS.model}`, batch {FLAGS.batch_size}, {FLAGS.precision}, data on device, "
             f"--batch_shards={FLAGS.batch_shards} --num_intra_threads={FLAGS.num_intra_threads} "
             f"--num_inter_threads={FLAGS.num_inter_threads}; {n} traced steps.\n",
             f"Wall time per step {summary['wall_ms_per_step_traced']:.2f} ms traced "
             f"({summary['wall_ms_per_step_untraced']:.2f} ms untraced); "
             f"{summary['ops_per_step']:.0f} ops per step; op time {op_ms:.2f} ms per step summed "
             f"over threads; {summary['executor_threads']} executor threads busy "
             f"{summary['busy_ms_per_step']:.2f} ms per step in all (ops plus scheduling).\n",
             "| op type | per step | ms per step | share of op time |",
             "| --- | ---: | ---: | ---: |"]
    for op, o in sorted(ops.items(), key=lambda kv: -kv[1]["ms_per_step"])[:FLAGS.top]:
        lines.append(f"| `{op}` | {o['per_step']:.1f} | {o['ms_per_step']:.3f} | "
                     f"{100 * o['ms_per_step'] / op_ms:.1f}% |")
    shares = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in summary["ops_at_once_share"].items())
    lines += ["", f"Ops running at once, share of the traced wall time: {shares}. The nodes that "
              "most often ran alone (ms per step; with one thread per core, the other cores "
              "idled meanwhile):\n", "| node (op type) | ms per step alone |", "| --- | ---: |"]
    for node, ns in trace["alone_ns"].most_common(8):
        lines.append(f"| `{node}` | {ns / 1e6 / n:.3f} |")
    payload["alone_ms_per_step"] = {node: ns / 1e6 / n for node, ns in trace["alone_ns"].items()}
    payload["nodes"] = {node: ps / 1e9 / n for node, ps in trace["nodes"].items()}
    lines += ["", "The most expensive nodes (summed over shards):\n",
              "| node (op type) | ms per step |", "| --- | ---: |"]
    for node, ps in trace["nodes"].most_common(FLAGS.top):
        lines.append(f"| `{node}` | {ps / 1e9 / n:.3f} |")
    common.write_report(FLAGS.output_dir, FLAGS.report_name, payload, lines)


if __name__ == "__main__":
    common.run(main)
