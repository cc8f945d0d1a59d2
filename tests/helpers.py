"""Helpers for end-to-end tests: run train.py, a benchmark or a notebook-style script, read
TensorBoard event files."""

import json
import os
import signal
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FRESH = os.environ.get("TAPELOOP_TESTS_FRESH") == "1"
# Slices of the built-in fontdigits for a test that trains and evaluates on it but needs
# neither its whole training split nor all 10,000 test images (seconds each eval).
FONTDIGITS_SLICES = dict(dataset="fontdigits", train_split="train[:1024]",
                         eval_split="test[:256]")


def run_train(*flags, timeout=300, env=None, fresh=False):
    """Runs `python train.py FLAGS...`; returns the CompletedProcess (text). A fork of a
    process that has imported TensorFlow runs it (tests/forkserver.py), unless the run
    needs an environment of its own (`env`), asks for a `fresh` interpreter, or
    TAPELOOP_TESTS_FRESH=1."""
    return run_script("train.py", *flags, timeout=timeout, env=env, fresh=fresh)


def run_script(script, *flags, timeout=300, env=None, fresh=False):
    """Runs `python SCRIPT FLAGS...` (SCRIPT relative to the repo, e.g.
    benchmarks/throughput.py) in the repo, as run_train runs train.py."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    argv = [os.path.join(ROOT, script), *flags]
    if not (env or fresh or FRESH):
        return forkserver.run(argv, full_env, ROOT, timeout)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full_env)


class Notebook:
    """A script run as a notebook's cells (`python -c SCRIPT ARGS...`), its output (stderr
    too) read line by line, and Ctrl-C sent as a terminal sends it."""

    def __init__(self, script, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
            # A shell starts background jobs with SIGINT ignored, which Python keeps.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()

    def wait_for(self, *texts):
        """Reads up to the first line holding one of `texts`; returns it."""
        for line in self.proc.stdout:
            self.lines.append(line)
            if any(text in line for text in texts):
                return line
        raise AssertionError(f"the script ended before any of {texts}:\n"
                             + "".join(self.lines)[-3000:])

    def ctrl_c(self):
        self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout=240):
        """Waits for the end; returns (exit code, the whole output)."""
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.lines) + out


_RUN_EACH = """
import json, sys
import core
from core.config import Config
from core.errors import TapeloopError
for kw in json.loads(sys.argv[1]):
    try:
        core.run(Config(**kw))
        print("ran")
    except TapeloopError as e:
        print(f"{e} (exit {e.exit_code})")
"""


def run_unprivileged(configs, timeout=300):
    """Runs `core.run(Config(**c))` for each dict `c` of `configs` in one fresh interpreter,
    whose file modes count even as root (it goes without the capabilities that read and
    search any file: `setpriv`); returns one line each, the error and its exit code, or
    'ran'."""
    without = (["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
               if os.geteuid() == 0 else [])
    proc = subprocess.run([*without, sys.executable, "-c", _RUN_EACH, json.dumps(configs)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def event_tags(folder):
    """{tag: [(step, value-or-None)]} from the TF2 summaries (stored as tensors) in `folder`."""
    acc = EventAccumulator(folder, size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        out[tag] = []
        for e in events:
            value = None
            if e.tensor_proto.dtype == 1 and not e.tensor_proto.tensor_shape.dim:  # float scalar
                import tensorflow as tf

                value = float(tf.make_ndarray(e.tensor_proto))
            out[tag].append((e.step, value))
    return out


def checkpoint_files(model_dir):
    """{name: bytes} of every checkpoint file (a folder: its file names), to prove a failed
    or read-only run left them intact."""
    out = {}
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.startswith("ckpt-") or name.startswith("checkpoint"):
            out[name] = (sorted(os.listdir(path)) if os.path.isdir(path)
                         else open(path, "rb").read())
    return out


def graph_nodes(folder):
    """{node name: op type} of the graph in `folder`'s event files (TensorBoard's Graphs
    tab), its functions' bodies included, and the names of functions XLA must compile."""
    acc = EventAccumulator(folder)
    acc.Reload()
    graph = acc.Graph()
    nodes = {n.name: n.op for n in graph.node}
    xla = set()
    for f in graph.library.function:
        nodes.update({n.name: n.op for n in f.node_def})
        if f.attr["_XlaMustCompile"].b:
            xla.add(f.signature.name)
    return nodes, xla


def served(export_dir, signature, **inputs):
    """`signature`'s outputs as TF Serving and `saved_model_cli run` compute them: the
    SavedModel's graph in a session, its variables restored by the graph's own restore op
    (not `tf.saved_model.load`); {output name: array}."""
    import tensorflow as tf

    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta = tf.compat.v1.saved_model.load(session, ["serve"], export_dir)
        sig = meta.signature_def[signature]
        feed = {sig.inputs[name].name: value for name, value in inputs.items()}
        names = sorted(sig.outputs)
        values = session.run([sig.outputs[n].name for n in names], feed)
    return dict(zip(names, values))
