"""Two worker processes on 127.0.0.1 train together with MultiWorkerMirroredStrategy."""

import json
import os
import re
import socket
import subprocess
import sys

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


def test_two_workers_train_together(tmp_path, idx_dir):
    flags = ["--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:2000]",
             "--eval_split=test[9000:]", "--train_steps=20", "--log_every=10",
             "--eval_every=20", "--batch_size=64"]
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    model_dir = tmp_path / "chief"
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), "--strategy=multi_worker",
             f"--model_dir={model_dir}", *flags],
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
        assert "2 workers, 2 replicas in sync" in log
    # The chief (worker 0) wrote everything; worker 1 wrote to a temporary dir it removed.
    assert (model_dir / "ckpt-20.index").exists()
    assert (model_dir / "reconstructions.png").exists()
    assert any(f.startswith("events") for f in os.listdir(model_dir / "train"))
    temp = re.search(r"removed this worker's temporary dir (\S+)", logs[1]).group(1)
    assert not os.path.exists(temp)
    assert "removed this worker's temporary dir" not in logs[0]
    # Both workers saw the same global loss, equal to one process with the same global batch.
    assert _last_loss(logs[0]) == _last_loss(logs[1])
    single = run_train(f"--model_dir={tmp_path / 'single'}", "--strategy=default", *flags)
    assert single.returncode == 0, single.stderr[-3000:]
    assert abs(_last_loss(single.stderr) - _last_loss(logs[0])) <= 1e-4 * _last_loss(logs[0])


def test_malformed_tf_config_is_one_line(tmp_path):
    proc = run_train("--strategy=multi_worker", f"--model_dir={tmp_path}", "--train_steps=1",
                     env={"TF_CONFIG": "{cluster: oops"})
    assert proc.returncode == 2
    assert "train.py: error: TF_CONFIG is not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
