"""Errors a user can cause. `train.py` prints them as one line, without a traceback."""

import re


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


class ModelMismatch(CheckpointError):
    """The checkpoint reads, but holds another model or optimizer than the one built."""


class WriteError(TapeloopError):
    """A file could not be written (TensorBoard's events, a figure, config.json, the best
    checkpoint, an export, shards): a full disk or quota, or permissions. Exit code 5, as
    for a checkpoint: the checkpoints written before are intact. Not a CheckpointError,
    which a continuous evaluation takes for a checkpoint rotated away as it read it."""

    exit_code = 5

    def __init__(self, what: str, reason: str,
                 then: str = "free space or fix permissions, then run the same command again"):
        self.what, self.reason = what, reason
        super().__init__(f"could not write {what} ({reason}): {then}")


class LostWorkerError(TapeloopError):
    """Another worker of a multi-worker run stopped or cannot be reached, so this one cannot
    go on alone; the chief's checkpoints are intact. Exit code 8."""

    exit_code = 8


class OutOfMemoryError(TapeloopError):
    """A step or an evaluation needed more device memory than there is; the steps trained
    before it were saved first."""

    exit_code = 6


def first_line(error: Exception | str, limit: int = 200) -> str:
    """The first non-blank line of an error's message (its type's name if it has none), at
    most `limit` characters: a longer line is cut at a space and ends with "...", so the
    one-line message says it was cut rather than stopping mid-word."""
    text = str(error).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if not line:
        return type(error).__name__ if not isinstance(error, str) else ""
    if len(line) <= limit:
        return line
    cut = line[:limit - 3]
    if cut.rfind(" ") > limit // 2:
        cut = cut[:cut.rfind(" ")]
    return cut.rstrip(" ,;:(") + "..."


def op_error_reason(error: Exception) -> str:
    """The line of a TensorFlow error that says what went wrong (e.g. "Invalid PNG data,
    size 4752"), without what wraps it: "Graph execution error:", "Detected at node ...",
    tf.data's "Error in user-defined function ... with iterator: ...:", "{{node ...}}"
    and "[Op:...]"."""

    text = str(getattr(error, "message", error))
    for line in text.splitlines():
        line = re.sub(r"\{\{[^}]*\}\}|\s*\[\[.*|\s*\[Op:.*", "", line).strip()
        line = re.sub(r"^Error in user-defined function .*? with iterator: \S+: ", "", line)
        if line and not line.startswith(("Graph execution error", "Detected at node", "<stack",
                                         'File "', "Defined at")):
            return first_line(line)
    return type(error).__name__


def write_reason(error: Exception) -> str:
    """Why a write failed, as the system says it ("No space left on device", "File too
    large", "Permission denied"): an OSError's own words, or the end of TensorFlow's
    "PATH; REASON" (with the op and the path of its temporary file before it)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    line = op_error_reason(error)
    return line.rsplit("; ", 1)[-1] if "; " in line else line


def flags_parser(program: str, command: str):
    """For `app.run(main, flags_parser=...)`: absl's parse, whose errors (an unknown flag, a
    value of the wrong kind or outside an enum, a missing --flagfile) become one line and
    exit code 2, as every other flag error here, instead of absl's two lines and exit 1."""
    import sys

    from absl import flags

    def fail(message: str) -> None:
        print(f"{program}: error: {message} ({command} --helpshort lists the flags)",
              file=sys.stderr)
        sys.exit(2)

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            # One line; absl starts a missing flagfile's message with "ERROR:: ".
            message = " ".join(str(e).replace("ERROR:: ", "").split())
            value = re.match(r"flag --\w+=(.*?): ", message)
            if value and re.search(r"\s(#|//|--?\w)", value.group(1)):
                message += f"; {_ONE_PER_LINE}"
            fail(message)
        swallowed = _swallowed_flag(flags.FLAGS, argv)
        if swallowed:
            name, value = swallowed
            fail(f"--{name} has no value: it took the next argument, {value}, as its value; "
                 f"give it one as --{name}=VALUE")
        joined = _joined_flag(flags.FLAGS)
        if joined:
            name, value = joined
            fail(f"--{name}={value}: {_ONE_PER_LINE}")
        return rest

    return parse


_ONE_PER_LINE = ("a --flagfile line is one flag, the rest of the line its value: put each "
                 "flag, and each comment (# ...), on a line of its own")


def _joined_flag(flag_values) -> tuple[str, str] | None:
    """(name, value) of a flag whose value holds another flag or a comment after a space.
    A --flagfile line is one flag, the rest of the line its value: `--model_dir=runs/a
    --train_steps=5` trained the defaults into a folder named `runs/a --train_steps=5`,
    and `--model_dir=runs/a  # baseline` into `runs/a  # baseline`."""
    for name, value in _given_strings(flag_values):
        if re.search(r"\s#\s", value) or any(
                _is_flag(other, flag_values) for other in re.findall(r"\s--?(\w+)", value)):
            return name, value
    return None


def _swallowed_flag(flag_values, argv: list[str]) -> tuple[str, str] | None:
    """(name, value) of a flag given without a value whose value is the next flag: absl
    reads `--keep_best --early_stopping_patience=2` as --keep_best='--early_stopping_patience=2'
    (a flag other than a boolean takes the next argument as its value), which would then
    be refused as an unknown metric at best, or be used: `--model_dir --train_steps=5`
    trained the defaults into a folder named `--train_steps=5`. Read from the arguments
    (each --flagfile's lines in its place): a value written after `=` that is a flag, as a
    benchmark's `--extra_flags=--seed=1`, is the value given."""
    args = flag_values.read_flags_from_files(argv[1:], force_gnu=False)
    for arg, following in zip(args, args[1:]):
        if arg == "--":
            break
        name = arg.lstrip("-")
        if (arg.startswith("-") and "=" not in arg and name in flag_values
                and not flag_values[name].boolean and following.startswith("-")
                and _is_flag(following.lstrip("-").split("=", 1)[0], flag_values)):
            return name, following
    return None


def _given_strings(flag_values):
    """(name, value) of each string given to a flag other than a boolean (each item of a
    list flag's)."""
    for name in flag_values:
        flag = flag_values[name]
        if flag.present and not flag.boolean:
            values = flag.value if isinstance(flag.value, list) else [flag.value]
            yield from ((name, value) for value in values if isinstance(value, str))


def _is_flag(name: str, flag_values) -> bool:
    return name in flag_values or (name.startswith("no") and name[2:] in flag_values)
