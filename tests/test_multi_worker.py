"""Two worker processes on 127.0.0.1 train together with MultiWorkerMirroredStrategy."""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

from conftest import fill
from core.config import Config
from helpers import ROOT, run_train


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _last_loss(log):
    return float(re.findall(r"train \| step \d+/\d+ \| epoch [\d.]+ \| loss ([\d.]+)", log)[-1])


def _last_eval(log, metric):
    return float(re.findall(rf"eval \(EMA weights\) \| step \d+ \|.*? {metric} ([\d.]+)",
                            log)[-1])


def test_two_workers_train_together(tmp_path, idx_dir):
    """From a checkpoint's weight average (--init_checkpoint), with a weight average of
    their own (--ema_decay): the loss and the EMA's evaluation match one process's. Without
    --strategy (auto), as a cluster manager that sets TF_CONFIG starts them: they join."""
    data = ["--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:2000]",
            "--eval_split=test[8976:]", "--log_every=10", "--batch_size=64",
            # 128 batches: 64 one call each (EVAL_CALLS_BEFORE_LOOP_MULTI_WORKER), 64 in a
            # compiled loop, then a call that finds none left (the workers agree on it)
            "--eval_batch_size=8"]
    source = run_train(f"--model_dir={tmp_path / 'source'}", "--strategy=default",
                       "--ema_decay=0.5", "--train_steps=10", "--eval_every=10", *data)
    assert source.returncode == 0, source.stderr[-3000:]
    flags = [*data, "--train_steps=20", "--eval_every=20", "--ema_decay=0.5",
             f"--init_checkpoint={tmp_path / 'source'}"]
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    model_dir = tmp_path / "chief"
    # Actions run on the chief only: each worker's calls would go to a file of its own.
    # Their True at step 20 of 30 stops both workers there.
    (tmp_path / "worker_actions.py").write_text(
        "import json, os\n"
        "def record(step, metrics):\n"
        "    task = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
        f"    with open(os.path.join({str(tmp_path)!r}, f'calls-{{task}}.txt'), 'a') as f:\n"
        "        f.write(f'{step} {sorted(metrics)}\\n')\n"
        "    return step >= 20\n")
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(tmp_path),
                   TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                         "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"),
             f"--model_dir={model_dir}", "--train_actions=worker_actions:record",
             "--eval_actions=worker_actions:record", *flags, "--train_steps=30"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=240)
            logs.append(err)
    finally:
        for proc in procs:
            proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
        assert "TF_CONFIG names a cluster of 2 training tasks: --strategy=auto joins it" in log
        assert "2 workers, 2 replicas in sync" in log
        assert "initialised the model's weights (its weight average, which" in log
        assert ("evaluation: after 64 calls of one batch each, a compiled loop of 64 batches "
                "a call from here") in log
    # The chief (worker 0) wrote everything; worker 1 wrote to a temporary dir it removed.
    assert (model_dir / "ckpt-20.index").exists() and not (model_dir / "ckpt-30.index").exists()
    assert "stopping at step 20 of 30: --train_actions=worker_actions:record returned True" \
        in logs[0]
    assert "stopping at step 20 of 30: an action on the chief returned True" in logs[1]
    assert (model_dir / "reconstructions.png").exists()
    assert any(f.startswith("events") for f in os.listdir(model_dir / "train"))
    temp = re.search(r"removed this worker's temporary dir (\S+)", logs[1]).group(1)
    assert not os.path.exists(temp)
    assert "removed this worker's temporary dir" not in logs[0]
    assert not (tmp_path / "calls-1.txt").exists()
    assert (tmp_path / "calls-0.txt").read_text().splitlines() == [
        "10 ['examples_per_sec', 'grad_norm', 'learning_rate', 'loss', 'step_time_ms']",
        "20 ['examples_per_sec', 'grad_norm', 'learning_rate', 'loss', 'step_time_ms']",
        "20 ['bce', 'loss', 'mse', 'psnr', 'ssim']"]
    # Both workers saw the same global loss, equal to one process with the same global batch.
    assert _last_loss(logs[0]) == _last_loss(logs[1])
    single = run_train(f"--model_dir={tmp_path / 'single'}", "--strategy=default", *flags)
    assert single.returncode == 0, single.stderr[-3000:]
    assert abs(_last_loss(single.stderr) - _last_loss(logs[0])) <= 1e-4 * _last_loss(logs[0])
    assert "initialised the model's weights (its weight average, which" in single.stderr
    assert "a compiled loop of 64 batches" not in single.stderr  # 128 calls: one process's
    for metric in ("bce", "psnr"):  # the average each evaluated with, at step 20
        assert _last_eval(logs[0], metric) == pytest.approx(_last_eval(single.stderr, metric),
                                                            rel=1e-3)


class _Workers:
    """Two train.py workers on 127.0.0.1; their stderr is collected as it comes."""

    def __init__(self, model_dir, flags, each=((), ()), commands=(None, None)):
        """`commands`: a worker's own argv instead of train.py's (its flags not added)."""
        workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
        self.procs, self.logs, self.readers = [], [[], []], []
        for index in range(2):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
                {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
            proc = subprocess.Popen(
                commands[index] or
                [sys.executable, os.path.join(ROOT, "train.py"), "--strategy=multi_worker",
                 f"--model_dir={model_dir}", *flags, *each[index]],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            reader = threading.Thread(
                target=lambda p=proc, log=self.logs[index]: log.extend(p.stderr), daemon=True)
            reader.start()
            self.readers.append(reader)
            self.procs.append(proc)

    def log(self, index):
        return "".join(self.logs[index])

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        codes = [proc.wait(timeout=max(1, deadline - time.monotonic())) for proc in self.procs]
        for reader in self.readers:  # every line, up to the end of each stream
            reader.join(timeout=30)
        return codes

    def kill(self):
        for proc in self.procs:
            proc.kill()


def _run_workers(model_dir, flags, each=((), ()), commands=(None, None)):
    """Two workers run to their end: their exit codes and logs."""
    workers = _Workers(model_dir, flags, each, commands)
    try:
        codes = workers.wait(timeout=240)
    finally:
        workers.kill()
    return codes, [workers.log(0), workers.log(1)]


def test_workers_started_with_other_flags_are_one_line_each_and_write_nothing(tmp_path):
    """A worker started with another --batch_size trained on, each worker at its own batch
    (the all-reduce sums gradients of any batch), and both failed in their first evaluation
    with a traceback. Flags of the machine (--data_dir, the thread counts) may differ."""
    model_dir = tmp_path / "run"
    flags = ["--dataset=synthetic", "--synthetic_shape=8,8,1", "--train_steps=2"]
    codes, logs = _run_workers(model_dir, flags, each=(
        ["--batch_size=64", "--num_intra_threads=1"], ["--batch_size=128", "--seed=3"]))
    assert codes == [2, 2], logs[0][-2000:] + logs[1][-2000:]
    for index, here in enumerate(["--batch_size=64, --seed=0", "--batch_size=128, --seed=3"]):
        assert logs[index].splitlines()[-1] == (
            f"train.py: error: this worker (worker{index}) was started with other flags than "
            f"another worker of TF_CONFIG: {here} here: start every worker with the same "
            "command (--data_dir, --cache and the CPU flags may differ by machine)")
    assert not model_dir.exists()
    codes, logs = _run_workers(model_dir, flags, each=(["--num_intra_threads=1"], []))
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert (model_dir / "ckpt-2.index").exists()


_NEWER = """
import dataclasses, sys
import core
from core.config import Config

@dataclasses.dataclass(frozen=True)
class Newer(Config):  # a later tapeloop, with one flag more
    a_newer_flag: int = 0

try:
    core.run(Newer(strategy="multi_worker", model_dir=sys.argv[1], dataset="synthetic",
                   synthetic_shape=(8, 8, 1), train_steps=2))
except core.errors.TapeloopError as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def test_workers_of_other_tapeloop_versions_are_one_line_each(tmp_path):
    """A worker on a machine with another tapeloop (a flag more or less) all-reduced a
    vector of flags of another length: both failed in a CollectiveReduceV2 traceback."""
    model_dir = tmp_path / "run"
    codes, logs = _run_workers(
        model_dir, ["--dataset=synthetic", "--synthetic_shape=8,8,1", "--train_steps=2"],
        commands=(None, [sys.executable, "-c", _NEWER, str(model_dir)]))
    assert codes == [2, 2], logs[0][-2000:] + logs[1][-2000:]
    flags = len(dataclasses.fields(Config))
    for index, (prefix, count) in enumerate([("train.py: error: ", flags), ("", flags + 1)]):
        assert logs[index].splitlines()[-1] == (
            f"{prefix}this worker (worker{index}) runs a tapeloop of other flags than another "
            f"worker of TF_CONFIG ({count} flags here): install the same tapeloop on every "
            "machine")
    assert not model_dir.exists()


def test_workers_whose_folders_hold_other_images_are_one_line_each(tmp_path):
    """One command, but one machine's copy of the folder holds more images: the workers
    planned other numbers of steps and waited for each other in mismatched collectives for
    good (a hang until killed). Now each says its own counts, exit 2, nothing written."""
    for name, count in (("a", 20), ("b", 40)):
        (tmp_path / name).mkdir()
        for i in range(count):
            png = tf.io.encode_png(tf.fill([8, 8, 3], tf.constant(i * 5, tf.uint8)))
            tf.io.write_file(str(tmp_path / name / f"{i:03d}.png"), png)
    flags = ["--dataset=folder", "--epochs=2", "--batch_size=4", "--image_size=8"]
    codes, logs = _run_workers(tmp_path / "run", flags, each=(
        [f"--data_dir={tmp_path / 'a'}"], [f"--data_dir={tmp_path / 'b'}"]))
    assert codes == [2, 2], logs[0][-2000:] + logs[1][-2000:]
    for index, (name, train, held_out) in enumerate([("a", 18, 2), ("b", 36, 4)]):
        assert logs[index].splitlines()[-1] == (
            f"train.py: error: this worker (worker{index}) reads other data than another "
            f"worker of TF_CONFIG: {train} training examples, {held_out} evaluation examples "
            f"here (--data_dir={tmp_path / name}): give every worker the same data")
    assert not (tmp_path / "run").exists()


def test_a_worker_whose_data_is_missing_is_one_line_on_the_other_before_training(tmp_path,
                                                                                 idx_dir):
    """Worker 1's --data_dir is not there (a flag of its machine): it stops with its own
    line, and worker 0, in its first collective (the weights' first values), said so with a
    traceback; now one line, exit 8."""
    flags = ["--dataset=mnist", "--train_split=test[:512]", "--eval_split=test[9900:]",
             "--train_steps=2", "--batch_size=64"]
    codes, logs = _run_workers(tmp_path / "run", flags, each=(
        [f"--data_dir={idx_dir}"], [f"--data_dir={tmp_path / 'nowhere'}"]))
    assert codes == [8, 3], logs[0][-2000:] + logs[1][-2000:]
    assert logs[1].splitlines()[-1].startswith(
        f"train.py: error: --data_dir={tmp_path / 'nowhere'} is not a folder")
    assert logs[0].splitlines()[-1].startswith(
        "train.py: error: lost another worker of the cluster before training (")
    assert logs[0].splitlines()[-1].endswith(
        "): it stopped or cannot be reached, and its own log says why; fix that, then start "
        "every worker again with the same command")
    assert "Traceback" not in logs[0] + logs[1]


@pytest.mark.parametrize("victim", [0, 1], ids=["sigterm_to_chief", "sigterm_to_worker1"])
def test_a_stop_signal_to_either_worker_stops_both_at_one_saved_step(tmp_path, idx_dir, victim):
    """SIGTERM to one worker: both stop at the same step, the chief's checkpoint holds it,
    both exit 75 within 60 s, and restarting both resumes there."""
    flags = ["--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:2000]",
             "--eval_split=test[9000:]", "--log_every=5", "--steps_per_loop=5",
             "--batch_size=64"]
    model_dir = tmp_path / "run"
    workers = _Workers(model_dir, [*flags, "--train_steps=100000"])
    try:
        deadline = time.monotonic() + 240
        while not re.search(r"train \| step [1-9]\d*/", workers.log(0)):
            assert time.monotonic() < deadline, workers.log(0)[-3000:]
            assert all(p.poll() is None for p in workers.procs), workers.log(0)[-3000:]
            time.sleep(0.2)
        os.kill(workers.procs[victim].pid, signal.SIGTERM)
        signalled = time.monotonic()
        codes = workers.wait(timeout=60)
        assert time.monotonic() - signalled < 60
    finally:
        workers.kill()
    logs = [workers.log(0), workers.log(1)]
    assert codes == [75, 75], logs[0][-2000:] + logs[1][-2000:]
    stops = [re.search(r"stopped by (.+?) at step (\d+) after saving", log) for log in logs]
    assert stops[victim].group(1) == "SIGTERM"
    assert stops[1 - victim].group(1) == "a stop signal on another worker"
    step = int(stops[0].group(2))
    assert int(stops[1].group(2)) == step > 0
    assert (model_dir / f"ckpt-{step}.index").exists()
    assert "Traceback" not in logs[0] + logs[1]

    # Worker 1's temporary dir is its user's (the uid in its name), and a symlink planted
    # where it goes is removed, not followed: the folder it points to keeps its file.
    temp = re.search(r"checkpoints and summaries go to (\S+),", logs[1]).group(1)
    assert f"tapeloop-worker1-{os.getuid()}-" in temp and not os.path.exists(temp)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "keep.txt").write_text("mine")
    os.symlink(decoy, temp)
    again = _Workers(model_dir, [*flags, f"--train_steps={step + 10}"])
    try:
        codes = again.wait(timeout=240)
    finally:
        again.kill()
    assert codes == [0, 0], again.log(0)[-2000:] + again.log(1)[-2000:]
    for index in range(2):
        assert f"resuming from step {step} towards {step + 10}" in again.log(index)
    assert (model_dir / f"ckpt-{step + 10}.index").exists()
    assert f"removed {temp}, a symlink or file in the way of this worker's dir" in again.log(1)
    assert (decoy / "keep.txt").read_text() == "mine" and not os.path.lexists(temp)


@pytest.mark.parametrize("how", ["chief_killed", "worker1_killed", "chief_disk_full"])
def test_a_worker_that_dies_is_one_line_on_the_other(tmp_path, idx_dir, request, how):
    """SIGKILL to one worker mid-run (a lost machine), or the chief's disk filling up (it
    exits 5 with its own line): the other's next all-reduce aborts, and it exits 8 with one
    line naming the chief's checkpoint to resume from, which is intact, instead of
    TensorFlow's traceback."""
    flags = ["--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:2000]",
             "--eval_split=test[9000:]", "--log_every=5", "--steps_per_loop=5",
             "--batch_size=64", "--checkpoint_every_steps=10", "--train_steps=100000"]
    disk = request.getfixturevalue("small_disk") if how == "chief_disk_full" else tmp_path
    model_dir = disk / "run"
    dead = 1 if how == "worker1_killed" else 0
    workers = _Workers(model_dir, flags)
    try:
        deadline = time.monotonic() + 240
        while not (model_dir / "ckpt-10.index").exists():
            assert time.monotonic() < deadline, workers.log(0)[-3000:]
            assert all(p.poll() is None for p in workers.procs), workers.log(0)[-3000:]
            time.sleep(0.1)
        if how == "chief_disk_full":
            fill(disk, 10)
        else:
            os.kill(workers.procs[dead].pid, signal.SIGKILL)
        code = workers.procs[1 - dead].wait(timeout=120)
        workers.readers[1 - dead].join(timeout=30)
        if how == "chief_disk_full":
            assert workers.procs[0].wait(timeout=60) == 5
            workers.readers[0].join(timeout=30)
            # Its own line says to restart every worker, not just itself: the others stop.
            assert re.search(r"train\.py: error: could not write the checkpoint at step \d+ in "
                             r".*\(No space left on device\).*; this was one worker of 2, and the "
                             r"others stop too: start every worker again, all with the same flags$",
                             workers.log(0), re.M), workers.log(0)
    finally:
        workers.kill()
    log = workers.log(1 - dead)
    assert code == 8, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    last = log.strip().splitlines()[-1]
    named = re.fullmatch(
        r"train\.py: error: lost another worker of the cluster in training \(.+\): it stopped "
        r"or cannot be reached, and its own log says why; the steps after the last checkpoint "
        r"are lost\. Fix that, then start every worker again with the same command to resume "
        r"from the chief's latest checkpoint, (\S+)", last)
    assert named, last
    if dead == 0:  # worker 1 survived: its temporary dir (a checkpoint or two) is gone
        temp = re.search(r"removed this worker's temporary dir (\S+)", log)
        assert temp and not os.path.exists(temp.group(1)), log[-3000:]
    # It is the state file's, and whole: its step is the one its name says.
    state = re.search(r'^model_checkpoint_path: "(.+)"$', (model_dir / "checkpoint").read_text(),
                      re.M)
    assert named.group(1) == str(model_dir / state.group(1))
    reader = tf.train.load_checkpoint(named.group(1))
    assert f"ckpt-{reader.get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE')}" == \
        os.path.basename(named.group(1))
    if dead == 1:
        # The killed worker could not remove its temporary dir (a checkpoint of the model);
        # started again as the line says, it removes it, and both resume from the chief's.
        left = re.search(r"checkpoints and summaries go to (\S+),", workers.log(1)).group(1)
        assert os.path.isdir(left)
        step = int(named.group(1).rsplit("-", 1)[1])
        again = _Workers(model_dir, [*flags[:-1], f"--train_steps={step + 5}"])
        try:
            codes = again.wait(timeout=240)
        finally:
            again.kill()
        assert codes == [0, 0], again.log(0)[-2000:] + again.log(1)[-2000:]
        assert f"removed {left}, which an earlier run of this worker left" in again.log(1)
        for index in range(2):
            assert f"resuming from step {step} towards {step + 5}" in again.log(index)
        assert not os.path.exists(left)


def test_a_nan_rolls_both_workers_back_together(tmp_path, idx_dir):
    """--nan_policy=rollback with two workers: a learning rate of 1e30 from step 20 on blows
    the loss up; the loss each worker checks is the global one, so both roll back to
    ckpt-20 at the same step, lower the rate alike, and finish the run together."""
    flags = ["--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:1024]",
             "--eval_split=test[9900:]", "--batch_size=32", "--steps_per_loop=5",
             "--log_every=5", "--checkpoint_every_steps=10", "--eval_every=100000"]
    model_dir = tmp_path / "run"
    for extra in (["--train_steps=20", "--learning_rate=0.004"],
                  ["--train_steps=60", "--learning_rate=1e30", "--nan_policy=rollback",
                   "--nan_lr_factor=0.5"]):
        workers = _Workers(model_dir, [*flags, *extra])
        try:
            codes = workers.wait(timeout=240)
        finally:
            workers.kill()
        assert codes == [0, 0], workers.log(0)[-2000:] + workers.log(1)[-2000:]
    rollbacks = [re.findall(r"rollback \d+/\d+.*", workers.log(i)) for i in range(2)]
    assert rollbacks[0] and rollbacks[0] == rollbacks[1]  # same step, checkpoint and rate
    assert [_last_loss(workers.log(i)) for i in range(2)] == [_last_loss(workers.log(0))] * 2
    assert (model_dir / "ckpt-60.index").exists()


def test_malformed_tf_config_is_one_line(tmp_path):
    proc = run_train("--strategy=multi_worker", f"--model_dir={tmp_path}", "--train_steps=1",
                     env={"TF_CONFIG": "{cluster: oops"})
    assert proc.returncode == 2
    assert "train.py: error: TF_CONFIG is not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_evaluator_task_is_one_line_and_trains_nothing(tmp_path):
    """It used to train a whole run of its own, alone, into a temporary dir, and exit 0."""
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    proc = run_train("--strategy=multi_worker", f"--model_dir={tmp_path / 'run'}",
                     "--train_steps=10", env={"TF_CONFIG": json.dumps(
                         {"cluster": {"worker": workers[:1], "evaluator": workers[1:]},
                          "task": {"type": "evaluator", "index": 0}})})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("train.py: error: TF_CONFIG's task is the evaluator, which does not train: run it "
            "with --mode=continuous_eval") in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_task_whose_port_is_taken_is_one_line_and_writes_nothing(tmp_path):
    """Another process listens on this task's port of TF_CONFIG (a worker of an earlier run
    still waiting, say): TensorFlow's "Could not start gRPC server" was a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        workers = [f"127.0.0.1:{taken.getsockname()[1]}", f"127.0.0.1:{_free_ports(1)[0]}"]
        proc = run_train("--strategy=multi_worker", f"--model_dir={tmp_path / 'run'}",
                         "--train_steps=1", "--dataset=synthetic", env={"TF_CONFIG": json.dumps(
                             {"cluster": {"worker": workers},
                              "task": {"type": "worker", "index": 0}})})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        f"train.py: error: TF_CONFIG gives this task (worker:0) the address {workers[0]}, and "
        "TensorFlow could not start its server on that port: another process listens there (a "
        "worker of an earlier run, still waiting, or one given this task's index too?) or the "
        "port is not open to this user: stop that process, or give the task a free port in "
        "TF_CONFIG")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def _worker(tmp_path, workers, *flags):
    """Worker 0 of `workers` through train.py, its stderr collected as it comes."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}}))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                             "--strategy=multi_worker", f"--model_dir={tmp_path / 'run'}",
                             *flags], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    log = []
    proc.reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    proc.reader.start()
    return proc, log


def _wait_for(proc, log, text, timeout=120):
    deadline = time.monotonic() + timeout
    while text not in "".join(log):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(log)[-3000:]
        time.sleep(0.02)


def test_ctrl_c_ends_the_wait_for_the_other_workers(tmp_path):
    """Worker 0 of two, whose partner never starts, waits inside TensorFlow holding the
    GIL, where no Python handler runs: Ctrl-C ended nothing until SIGKILL. Now it ends the
    process at once, by SIGINT, with nothing written."""
    proc, log = _worker(tmp_path, [f"127.0.0.1:{p}" for p in _free_ports(2)], "--train_steps=10")
    try:
        _wait_for(proc, log, "joining the cluster of TF_CONFIG")
        time.sleep(3)  # into TensorFlow's wait
        assert proc.poll() is None, "".join(log)[-3000:]
        os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert code == -signal.SIGINT  # ended by the signal
    assert not (tmp_path / "run").exists()


def test_sigterm_after_joining_is_ours_again(tmp_path):
    """Joining installs TensorFlow's own SIGTERM handler, which only takes note: a SIGTERM
    between joining and training was lost, and the run trained on. Now the start-up's
    handler is back as soon as the strategy exists: the run stops, with one line."""
    proc, log = _worker(tmp_path, [f"127.0.0.1:{_free_ports(1)[0]}"], "--train_steps=100000",
                        "--dataset=shapes", "--train_split=train[:256]",
                        "--eval_split=test[:64]")
    try:
        _wait_for(proc, log, "multi-worker: task worker0")
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    proc.reader.join(timeout=30)  # every line, up to the end of the stream
    text = "".join(log)
    # Wherever it landed: outside training (exit at once) or in it (checkpoint, exit 75).
    assert (code, "stopped by SIGTERM outside training" in text) == (143, True) or (
        code, "stopped by SIGTERM at step" in text) == (75, True), text[-3000:]
