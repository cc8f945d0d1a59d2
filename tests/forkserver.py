"""Runs `python train.py FLAGS...` (or a benchmark script) for the tests without paying
TensorFlow's import each time: a server process imports TensorFlow and tapeloop once, then
forks a child per run, which runs the script as `python SCRIPT` would (as __main__, its
argv, sys.path[0] its folder, the working directory, the environment, stdin from
/dev/null, stdout and stderr to the caller's files) and exits with its exit code. The
import is about 4 s of CPU a run, and the suite runs train.py a few hundred times.

The fork is safe because the server imports only: it never starts TensorFlow's runtime
(no eager context, no device, no thread pool), which the server checks. A run that needs
a different environment (an `env=` of its own), and every run when TAPELOOP_TESTS_FRESH=1,
starts a fresh interpreter instead (helpers.run_train).

What a fork has that a fresh `python train.py` has not yet when it parses its flags:
TensorFlow's modules, and the absl flags they define (--test_tmpdir, --hbm_oom_exit and
a few more), so a test of how train.py takes such a name needs a fresh run. A call that
TensorFlow's import queues for absl's app.run is dropped: a fresh run has none.
tests/test_cli.py checks that a fork's run and a fresh one give the same exit code,
output and weights.

Server: python tests/forkserver.py SOCKET_PATH; it exits when its stdin closes.
"""

import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------- the server
def _serve(path):
    """Answers requests until stdin closes; returns (in the child only) a request to run."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([server, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            # The tests' process is gone, perhaps killed before its atexit could remove
            # the socket's folder: remove it here, or /tmp keeps one per killed run.
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            os._exit(0)
        if server not in ready:
            continue
        conn, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(message)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            server.close()
            conn.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            return request
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        conn.close()


def _main(path):
    sys.path[0] = ROOT  # as `python train.py` has it: the script's folder, not tests/
    import matplotlib.pyplot  # noqa: F401
    import tensorflow as tf
    from tensorflow.python.eager import context

    import core.runner  # noqa: F401
    import core.plots  # noqa: F401
    import core.signals  # noqa: F401
    import layers  # noqa: F401

    # Forking a process whose TensorFlow runtime has started is not safe: only import.
    started = context.context_safe()
    assert started is None or started._context_handle is None, "TensorFlow's runtime started"
    del tf
    # TensorFlow's import queued a call for absl's app.run (it lists the GPUs), which in
    # `python train.py` is not imported yet when app.run runs: drop it, as it is not there.
    from absl import app

    app._init_callbacks.clear()
    request = _serve(path)
    # The child: become `python train.py ARGS` in the caller's directory and environment.
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    sys.path[0] = os.path.dirname(sys.argv[0])  # as `python SCRIPT` has it: its folder
    import runpy

    runpy.run_path(sys.argv[0], run_name="__main__")
    # Falls off the end as a script does: Python's own exit (threads joined, atexit run).


# ----------------------------------------------------------------------- the client
class _Server:
    """The server of this process, started at its first use, and again when the tests'
    environment has changed since (TensorFlow reads some of it at import)."""

    lock = threading.Lock()
    proc = None
    env = None

    @classmethod
    def address(cls, env):
        # (pytest names the running test in PYTEST_CURRENT_TEST: the child gets it as is)
        env = {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}
        with cls.lock:
            if cls.proc is not None and cls.proc.poll() is None and env != cls.env:
                cls.proc.stdin.close()  # it exits
                cls.proc.wait()
            if cls.proc is None or cls.proc.poll() is not None:
                folder = tempfile.mkdtemp(prefix="tapeloop-forkserver-")
                atexit.register(shutil.rmtree, folder, ignore_errors=True)
                cls.path = os.path.join(folder, "socket")
                cls.env = dict(env)
                cls.proc = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), cls.path], cwd=ROOT, env=env,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    text=True)
                line = cls.proc.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"the fork server did not start (exit {cls.proc.wait()})")
            return cls.path


def _line(conn):
    """The next line the server sends (its bytes up to the newline)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            raise RuntimeError("the fork server closed the connection")
        data += chunk
    return data.decode()


def run(argv, env, cwd, timeout):
    """`subprocess.run([sys.executable, *argv], capture_output=True, text=True, ...)` by a
    fork of a server started with the environment `env`."""
    path = _Server.address(env)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            open(os.devnull, "rb") as stdin, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        message = json.dumps({"argv": list(argv), "env": env, "cwd": cwd}).encode()
        socket.send_fds(conn, [message], [stdin.fileno(), out.fileno(), err.fileno()])
        pid = int(_line(conn))
        conn.settimeout(timeout)
        try:
            code = int(_line(conn))
            timed_out = False
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            conn.settimeout(None)
            _line(conn)
            timed_out = True
        texts = []
        for f in (out, err):
            f.seek(0)
            # as text=True reads them: UTF-8, universal newlines
            texts.append(f.read().decode().replace("\r\n", "\n").replace("\r", "\n"))
        if timed_out:
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, *texts)
        return subprocess.CompletedProcess([sys.executable, *argv], code, *texts)


if __name__ == "__main__":
    _main(sys.argv[1])
