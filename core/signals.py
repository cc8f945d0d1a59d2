"""SIGTERM and SIGINT: during training a stop (`StopSignals`); elsewhere on the command
line an exit (`ExitOnSignals`), and from Python (a notebook) a KeyboardInterrupt at the
run's next safe point (`DeferredInterrupt`). Imports no TensorFlow, so `train.py` takes
the signals over before TensorFlow's slow import."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from absl import logging


class _SignalWatcher:
    """Takes SIGTERM and SIGINT over in the main thread, and hands each to `_note` in a
    thread of its own, at once.

    Python runs a signal handler only between bytecodes, in the main thread, so a
    compiled loop of many steps would delay it until the loop ends; and the
    KeyboardInterrupt it raises lands wherever the main thread is: in TensorFlow tracing
    a function it has corrupted the heap ("corrupted size vs. prev_size", SIGABRT), and in
    a TensorFlow `__del__` Python drops it and the run goes on
    (`benchmarks/signal_stress.py` counts both). Instead the Python handler does nothing,
    the C handler writes the signal number to a wakeup pipe (`signal.set_wakeup_fd`), and
    a watcher thread reading it acts; TensorFlow releases the GIL while it runs ops, so the
    thread gets to run. On leaving, the handlers and wakeup pipe found on entering are put
    back; meanwhile the numbers of other signals are passed on to the wakeup pipe found
    (an asyncio loop's, whose handlers wait on it).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    active: list[_SignalWatcher] = []  # those installed, innermost last

    def __init__(self):
        self._previous = {}
        self._pipe = None
        self._previous_fd = -1
        self.pending = False  # a KeyboardInterrupt for the next `interruption_point`
        self._now = False  # a KeyboardInterrupt for the main thread's next bytecode
        self._raised = False
        self._count = 0  # signals received
        self._lock = threading.Lock()
        # From Python (not the command line, whose `ExitOnSignals` is active around it):
        # Ctrl-C ends in a KeyboardInterrupt, which a notebook's kernel survives.
        self.from_python = True

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # a notebook worker thread: no handlers
        self.from_python = not any(isinstance(w, ExitOnSignals) for w in _SignalWatcher.active)
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name=type(self).__name__,
                                        daemon=True)
        self._thread.start()
        _SignalWatcher.active.append(self)
        return self

    def _note(self, signum: int) -> None:
        raise NotImplementedError

    def _counted(self) -> int:
        """This signal's number in the order received: 1 for the first."""
        with self._lock:
            self._count += 1
            return self._count

    def _watch(self) -> None:
        read_fd = self._pipe[0]
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            others = bytes(signum for signum in data if signum not in self.SIGNALS)
            if others and self._previous_fd >= 0:
                # Another signal, whose owner (an asyncio loop: a notebook's kernel) waits
                # for it on the pipe we took over: passed on.
                try:
                    os.write(self._previous_fd, others)
                except OSError:
                    pass
            for signum in data:
                if signum in self.SIGNALS:
                    self._note(signum)

    def _interrupt(self, at_safe_point: bool, message: str) -> None:
        """KeyboardInterrupt at the next `interruption_point`, saying `message`; or, if not
        `at_safe_point` (a later Ctrl-C), at once."""
        if at_safe_point:
            logging.warning(message)
            self.pending = True
        elif not self._now:
            self._now = True
            # Again to the main thread, whose `_handle` may have run before `_now` was set:
            # a real signal (not `_thread.interrupt_main`) also wakes a sleeping syscall.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def _handle(self, signum, frame):
        # In the main thread, for each signal; the watcher thread acts on every signal, as
        # soon as it arrives, and only asks for this KeyboardInterrupt (once).
        if self._now and not self._raised:
            self._raised = True
            raise KeyboardInterrupt

    def __exit__(self, exc_type, *rest):
        self._release()
        if self.pending and exc_type is None:  # the end is the last safe point
            raise KeyboardInterrupt

    def _release(self) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._pipe[1])  # ends the watcher's read, once it has read what came
        self._thread.join(timeout=10)  # every signal that came is acted on or passed on
        os.close(self._pipe[0])
        self._pipe = None
        _SignalWatcher.active.remove(self)


class StopSignals(_SignalWatcher):
    """During training. First SIGTERM/SIGINT: finish the current loop, checkpoint, exit 75.
    Second: exit now, with code 128 + the signal number, whatever the process is doing.
    From Python (a notebook, whose kernel an exit would take down), a second Ctrl-C
    instead raises KeyboardInterrupt at the next safe point (`interruption_point`: when the
    current loop's steps return, between evaluation batches), without saving, and a third
    wherever the run is once Python runs again (in your slow action, say).

    A save cut short by that exit is cleaned up by the next run
    (`Checkpointer.remove_orphans`), which resumes from the last complete checkpoint.
    """

    def __init__(self):
        super().__init__()
        self.received: str | None = None

    def _note(self, signum: int) -> None:
        count = self._counted()
        name = signal.Signals(signum).name
        if count >= 2 and signum == signal.SIGINT and self.from_python:
            self._interrupt(count == 2, "second Ctrl-C: KeyboardInterrupt, without saving, as "
                            "soon as the current loop's steps return (a compiled loop cannot "
                            "be left sooner); a third raises it wherever the run is then")
            return
        if count >= 2:
            logging.warning("second signal (%s): exiting now", name)
            exit_now(128 + signum)
        if self.received is None:
            self.received = name
            again = ("press it again to interrupt without saving" if self.from_python
                     and signum == signal.SIGINT else "send it again to exit at once")
            logging.warning("%s received: finishing the current loop (at most --steps_per_loop "
                            "steps), then saving a checkpoint; %s", name, again)

    def __call__(self) -> str | None:
        return self.received


class ExitOnSignals(_SignalWatcher):
    """The command line outside training (start-up, evaluation, export, figures): SIGTERM or
    SIGINT exits at once with `message` on stderr and code 128 + the signal number.

    No checkpoint is written there; the files a run writes are written beside and renamed
    (config.json, eval_results.json, the figures, the export), or appended to
    (TensorBoard's events, whose reader skips a last record cut short), so an exit at any
    moment leaves the old file or the new one. The model-dir locks this process holds
    are released first, so the next run finds the dir free rather than taken over.
    Training's own handling (`StopSignals`) takes the signals over while it runs and
    hands them back after.
    """

    def __init__(self, message):
        """`message`: a str with `{signal}` in it, or a function of the signal's name."""
        super().__init__()
        self.message = message

    def _note(self, signum: int) -> None:
        try:
            checkpoints = sys.modules.get("core.checkpoints")  # not imported: no lock held
            if checkpoints:
                checkpoints.ModelDirLock.release_held()
            # The message is the last line. The main thread runs on while this one waits
            # for the GIL or a write: a line it is logging is finished first, and then it
            # logs no more (its handlers held); anything else written to stderr
            # (TensorFlow's C++ logs) goes to /dev/null, the message to a copy of stderr.
            _hold_log_handlers()
            stderr = os.dup(2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            name = signal.Signals(signum).name
            line = self.message(name) if callable(self.message) else self.message.format(
                signal=name)
            os.write(stderr, line.encode() + b"\n")
        finally:  # whatever failed (stderr a closed pipe: `train.py ... 2>&1 | head`), exit
            exit_now(128 + signum)


_PARTIAL: list[str] = []  # local files and folders being written, which `exit_now` removes


@contextlib.contextmanager
def removed_if_exiting(path: str | None):
    """While this runs, an exit at once (`exit_now`: a signal outside training) removes
    `path`, a local file or folder being written under a name of its own (a --cache being
    decoded, a file written beside before its rename), which nothing would read or remove
    after. None, or an object store's path: nothing to remove."""
    path = path if path and "://" not in path else None
    if path:
        _PARTIAL.append(path)
    try:
        yield
    finally:
        if path:
            _PARTIAL.remove(path)


def exit_now(code: int) -> None:
    """Ends the process at once with `code` (`os._exit`: no atexit handlers, no waiting for
    the main thread). AutoGraph writes each function it converts to a temporary
    `__autograph_generated_file*.py` and removes it only at exit, by atexit, which
    `os._exit` skips: those files are removed here first, or every such exit would leave a
    few in the temporary dir; so are the files and folders being written
    (`removed_if_exiting`)."""
    try:
        import shutil

        for path in list(_PARTIAL):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
        for name, module in list(sys.modules.items()):
            if name.startswith("__autograph_generated_file"):
                with contextlib.suppress(OSError, AttributeError, TypeError):
                    os.remove(module.__file__)
    finally:
        os._exit(code)


def _hold_log_handlers(timeout: float = 2.0) -> None:
    """Takes the lock of every logging handler (each waited for at most `timeout`
    seconds, so a handler stuck elsewhere cannot stop an exit), and never releases them:
    for a process about to exit."""
    import logging as std_logging

    loggers = [std_logging.getLogger(), *(logger for logger in
                                          std_logging.Logger.manager.loggerDict.values()
                                          if isinstance(logger, std_logging.Logger))]
    handlers = {handler for logger in loggers for handler in logger.handlers}
    handlers.add(logging.get_absl_handler().python_handler)  # absl's, behind its ABSLHandler
    for handler in handlers:
        if handler.lock is not None:
            handler.lock.acquire(timeout=timeout)


class DeferredInterrupt(_SignalWatcher):
    """`core.run` from Python (a notebook, a script) outside training, unless the command
    line's `ExitOnSignals` handles the signals: Ctrl-C (SIGINT) raises KeyboardInterrupt
    at the run's next safe point (`interruption_point`: between evaluation batches, between
    the steps of starting a run, before the figures and an export, while waiting for a
    checkpoint), never inside TensorFlow, where Python's own would land anywhere (tracing
    a function: a corrupted TensorFlow, a dead kernel). A second Ctrl-C raises it at once,
    wherever the run is. SIGTERM is left as it was."""

    SIGNALS = (signal.SIGINT,)

    def _note(self, signum: int) -> None:
        self._interrupt(self._counted() == 1, "Ctrl-C: interrupting at the run's next safe "
                        "point (at most one evaluation batch or one step of starting the run "
                        "away); press it again to interrupt at once")


def interruption_point() -> None:
    """A safe point for a Ctrl-C from Python (`DeferredInterrupt`, `StopSignals`): raises
    KeyboardInterrupt if one is pending. Call it only where no TensorFlow function is
    being traced."""
    for watcher in _SignalWatcher.active:
        if watcher.pending:
            watcher.pending = False
            raise KeyboardInterrupt


def deferred_interrupt():
    """`DeferredInterrupt`, unless another watcher (the command line's) handles the signals
    or this is not the main thread; else a context that does nothing."""
    if _SignalWatcher.active or threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    return DeferredInterrupt()


@contextlib.contextmanager
def joining_a_cluster():
    """Around MultiWorkerMirroredStrategy's creation, which waits in TensorFlow's C++ for
    every worker of TF_CONFIG to start (up to TensorFlow's hour), holding the GIL: no Python
    runs meanwhile, neither a handler nor the watcher thread, so a Ctrl-C did nothing until
    SIGKILL. On the command line (`ExitOnSignals` active) SIGINT gets its default action for
    that time: the process ends at once, by the signal, which loses nothing (no checkpoint
    is open, the model dir's lock is taken later). SIGTERM cannot be: the wait installs
    TensorFlow's own SIGTERM handler (its preemption notifier, which only takes note), so it
    waits on; cluster managers follow SIGTERM with SIGKILL. On leaving, both handlers found
    on entering are put back, taking SIGTERM back from TensorFlow (it was TensorFlow's until
    training began). From Python (a notebook, whose kernel an exit would end), SIGINT is
    left as it was."""
    previous = {sig: signal.getsignal(sig) for sig in _SignalWatcher.SIGNALS}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if any(isinstance(w, ExitOnSignals) for w in _SignalWatcher.active):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: not installed from Python
                signal.signal(sig, handler)
