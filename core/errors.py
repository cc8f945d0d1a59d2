"""Errors a user can cause. `train.py` prints them as one line, without a traceback."""


class TapeloopError(Exception):
    """Base class: the message says what was wrong and how to fix it."""

    exit_code = 1


class ConfigError(TapeloopError):
    """A flag value or combination of flags is invalid (exit code 2, like a usage error)."""

    exit_code = 2


class DataError(TapeloopError):
    """A data file is missing, corrupted or cannot be fetched."""

    exit_code = 3


class NonFiniteLossError(TapeloopError):
    """The training loss became NaN or Inf."""

    exit_code = 4


class Preempted(TapeloopError):
    """A stop was requested (SIGTERM/SIGINT); the run saved a checkpoint first."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class CheckpointError(TapeloopError):
    """A checkpoint cannot be read or written, or the model dir is held by another run."""

    exit_code = 5
