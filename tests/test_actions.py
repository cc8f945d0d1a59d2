"""Train and eval actions (core/actions.py): your functions in the outer loop."""

import json
import os
import re
import sys

import numpy as np
import pytest

import core
from core.config import Config
from core.errors import ConfigError
from helpers import ROOT, checkpoint_files, event_tags, run_train


def _config(tmp_path, **kw):
    base = dict(dataset="fontdigits", train_split="train[:640]", eval_split="test[:128]",
                model_dir=str(tmp_path / "run"), train_steps=40, epochs=None, batch_size=32,
                eval_every=20, log_every=10, steps_per_loop=10)
    base.update(kw)
    return Config(**base)


def test_actions_get_what_tensorboard_gets(tmp_path):
    """From Python: a train action at every summary with train/'s values, an eval action
    after every evaluation with eval/'s, named and given actions alike, in that order."""
    calls = []
    config = _config(tmp_path)
    core.run(config, train_actions=[lambda step, m: calls.append(("train", step, m))],
             eval_actions=[lambda step, m: calls.append(("eval", step, m))])
    assert [(kind, step) for kind, step, _ in calls] == [
        ("train", 10), ("train", 20), ("eval", 20), ("train", 30), ("train", 40), ("eval", 40)]
    train = dict(event_tags(str(tmp_path / "run" / "train"))["grad_norm"])
    loss = dict(event_tags(str(tmp_path / "run" / "train"))["loss"])
    psnr = dict(event_tags(str(tmp_path / "run" / "eval"))["psnr"])
    for kind, step, metrics in calls:
        if kind == "train":
            assert set(metrics) == {"loss", "examples_per_sec", "learning_rate", "step_time_ms",
                                    "grad_norm"}
            assert metrics["grad_norm"] == pytest.approx(train[step], rel=1e-6)
            assert metrics["loss"] == pytest.approx(loss[step], rel=1e-6)
        else:
            assert set(metrics) == {"loss", "bce", "mse", "psnr", "ssim"}
            assert metrics["psnr"] == pytest.approx(psnr[step], rel=1e-6)

    # --mode=eval: once, with the evaluated checkpoint's step and results.
    calls.clear()
    results = core.run(config.replace(mode="eval"), given={"mode", "model_dir"},
                       eval_actions=[lambda step, m: calls.append(("eval", step, m))])
    assert [(kind, step) for kind, step, _ in calls] == [("eval", 40)]
    assert calls[0][2]["psnr"] == pytest.approx(results["psnr"])


def test_the_readme_action_writes_every_number(tmp_path, monkeypatch):
    """The README's `# my_actions.py`, named as its command names it, run from a folder."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(r"```python\n(# my_actions\.py.*?)```", readme, re.S)
    assert found, "README.md lost its my_actions.py example"
    (tmp_path / "my_actions.py").write_text(found.group(1))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_actions", raising=False)
    core.run(_config(tmp_path, train_actions=("my_actions:record",),
                     eval_actions=("my_actions:record",)))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], "psnr" in line) for line in lines] == [
        (10, False), (20, False), (20, True), (30, False), (40, False), (40, True)]
    assert all(0 < line["loss"] < 1 for line in lines)


def test_the_readme_stopping_action_stops_the_default_run_where_it_says(tmp_path, monkeypatch):
    """The README's `# my_stop.py` on the default run (its command but the model dir):
    the eval PSNR passes 15 dB at step 468, where the run stops."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(r"```python\n(# my_stop\.py.*?)```", readme, re.S)
    assert found, "README.md lost its my_stop.py example"
    assert "logs `stopping at step 468 of\n1170: --eval_actions=my_stop:good_enough" in readme
    (tmp_path / "my_stop.py").write_text(found.group(1))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_stop", raising=False)
    result = core.run(Config(eval_actions=("my_stop:good_enough",),
                             model_dir=str(tmp_path / "runs" / "stop")))
    assert result["step"] == 468


def _module(tmp_path, monkeypatch, body):
    folder = tmp_path / "code"
    folder.mkdir(exist_ok=True)
    (folder / "my_actions.py").write_text(body)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "my_actions", raising=False)  # another test's
    return folder


def test_a_named_action_that_raises_stops_the_run_with_its_steps_saved(tmp_path):
    """From the command line: --train_actions=MODULE:FUNCTION; one that raises at step 20
    is one line and exit 7 after ckpt-20 is saved; fixed, the same command resumes there,
    and its True at step 30 ends the run there, saved, with exit 0."""
    folder = tmp_path / "code"
    folder.mkdir()
    log = tmp_path / "calls.jsonl"
    body = ("import json\n"
            "def record(step, metrics):\n"
            f"    with open({str(log)!r}, 'a') as f:\n"
            "        f.write(json.dumps([step, metrics]) + '\\n')\n"
            "    if step == 20 and FAIL:\n"
            "        raise KeyError('psnr_db')\n"
            "    return step == 30\n")
    (folder / "my_actions.py").write_text("FAIL = True\n" + body)
    flags = ["--dataset=fontdigits", "--train_split=train[:640]", "--eval_split=test[:128]",
             f"--model_dir={tmp_path / 'run'}", "--train_steps=40", "--batch_size=32",
             "--eval_every=100", "--log_every=10", "--steps_per_loop=10",
             "--train_actions=my_actions:record"]
    proc = run_train(*flags, env={"PYTHONPATH": str(folder)})
    assert proc.returncode == 7, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py:")]
    assert lines == [f"train.py: error: --train_actions=my_actions:record raised at step 20 "
                     f"(KeyError: 'psnr_db'); saved {tmp_path / 'run' / 'ckpt-20'}: fix it and "
                     "run the same command to resume"]
    assert "ckpt-20.index" in checkpoint_files(str(tmp_path / "run"))
    (folder / "my_actions.py").write_text("FAIL = False\n" + body)
    proc = run_train(*flags, env={"PYTHONPATH": str(folder)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from step 20" in proc.stderr
    assert "stopping at step 30 of 40: --train_actions=my_actions:record returned True" in \
        proc.stderr
    steps = [json.loads(line)[0] for line in log.read_text().splitlines()]
    assert steps == [10, 20, 30]
    saved = checkpoint_files(str(tmp_path / "run"))
    assert "ckpt-30.index" in saved and "ckpt-40.index" not in saved


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_an_action_that_returns_true_stops_the_run_at_that_step(tmp_path, kind, caplog):
    """Returning True (a NumPy bool too) ends training at that step, saved, with the figures
    drawn, after every action due there ran; False and None go on; any other value is
    warned of once and ignored."""
    def stop(step, metrics):
        return np.bool_(step >= 20)

    def chatty(step, metrics):
        return {"seen": step}

    evaluated = []
    actions = {"train_actions": [], "eval_actions": [lambda step, m: evaluated.append(step)]}
    actions[f"{kind}_actions"] += [chatty, lambda step, m: None, stop]
    with caplog.at_level("INFO", logger="absl"):
        results = core.run(_config(tmp_path, train_steps=60), **actions)
    assert results["step"] == 20
    assert evaluated == [20]  # every action at the step is called, whichever asked first
    saved = checkpoint_files(str(tmp_path / "run"))
    assert "ckpt-20.index" in saved and not [f for f in saved if f.startswith("ckpt-30")]
    assert (tmp_path / "run" / "reconstructions.png").exists()
    assert sum("returned {'seen': " in r.getMessage() for r in caplog.records) == 1
    stopping = rf"stopping at step 20 of 60: the {kind} action .*stop returned True"
    assert any(re.match(stopping, r.getMessage()) for r in caplog.records)


def test_a_continuous_evaluation_ends_where_the_training_stopped_early(tmp_path, caplog):
    """A run stopped at step 20 of 60 (by an action, or early stopping) writes no more
    checkpoints: a continuous evaluation beside it waited for its timeout (an hour by
    default). The run records where it stopped, and the evaluation ends there; a resume that
    goes on clears the record."""
    config = _config(tmp_path, train_steps=60, mode="train")
    core.run(config, train_actions=[lambda step, m: step >= 20])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["resolved_stopped_early_at"] == 20 and saved["resolved_total_steps"] == 60
    with caplog.at_level("INFO", logger="absl"):
        results = core.run(Config(mode="continuous_eval", model_dir=str(tmp_path / "run"),
                                  continuous_eval_timeout=120),
                           given={"mode", "model_dir", "continuous_eval_timeout"})
    assert results["step"] == 20 and [e["step"] for e in results["evaluations"]] == [20]
    messages = [r.getMessage() for r in caplog.records]
    assert ("continuous eval: evaluated step 20, where the training stopped early: done"
            in messages)
    assert not any("no new checkpoint" in m for m in messages)
    core.run(config.replace(train_steps=40))  # resumed, to its end
    assert "resolved_stopped_early_at" not in json.loads(
        (tmp_path / "run" / "config.json").read_text())
    # Early stopping: a train_and_eval run on weights that cannot move stops after 2 flat
    # evaluations, at step 60 of 200.
    early = _config(tmp_path, model_dir=str(tmp_path / "early"), learning_rate=1e-12,
                    train_steps=200, early_stopping_patience=2)
    assert core.run(early)["step"] == 60
    results = core.run(Config(mode="continuous_eval", model_dir=early.model_dir,
                              continuous_eval_timeout=120),
                       given={"mode", "model_dir", "continuous_eval_timeout"})
    assert results["step"] == 60 and len(results["evaluations"]) == 1


def test_an_eval_action_that_returns_true_ends_a_continuous_evaluation(tmp_path, caplog):
    """An eval action's True ends a continuous evaluation at the step it returned True."""
    core.run(_config(tmp_path, train_steps=60, mode="train"),
             train_actions=[lambda step, m: step >= 20])
    with caplog.at_level("INFO", logger="absl"):
        results = core.run(Config(mode="continuous_eval", model_dir=str(tmp_path / "run"),
                                  continuous_eval_timeout=120),
                           given={"mode", "model_dir", "continuous_eval_timeout"},
                           eval_actions=[lambda step, m: m["psnr"] > 0])
    assert results["step"] == 20
    assert any("continuous eval: the eval action" in r.getMessage()
               and "returned True at step 20: done" in r.getMessage() for r in caplog.records)
    assert not any("no new checkpoint" in r.getMessage() for r in caplog.records)


def test_an_eval_action_that_raises_in_eval_mode_keeps_the_results(tmp_path):
    config = _config(tmp_path, train_steps=20)
    core.run(config)
    before = checkpoint_files(str(tmp_path / "run"))

    def fails(step, metrics):
        raise ValueError("no server")

    with pytest.raises(core.TapeloopError, match=re.escape(
            "the eval action test_an_eval_action_that_raises_in_eval_mode_keeps_the_results."
            "<locals>.fails raised at step 20 (ValueError: no server)")) as caught:
        core.run(config.replace(mode="eval"), given={"mode", "model_dir"}, eval_actions=[fails])
    assert caught.value.exit_code == 7
    assert json.load(open(tmp_path / "run" / "eval_results.json"))["step"] == 20
    assert checkpoint_files(str(tmp_path / "run")) == before  # read-only, as ever


@pytest.mark.parametrize("body, flag, message", [
    ("def f(metrics): pass\n", "--eval_actions=my_actions:f",
     "--eval_actions=my_actions:f: an action is called as action(step, metrics); its signature "
     "is (metrics): take two arguments"),
    ("x = 1\n", "--train_actions=my_actions:f",
     "--train_actions=my_actions:f: my_actions has no callable 'f': define f(step, metrics)"),
    ("raise RuntimeError('oops')\n", "--train_actions=my_actions:f",
     "--train_actions=my_actions:f: importing my_actions failed (RuntimeError: oops)"),
])
def test_a_bad_action_is_one_line_before_anything_is_written(tmp_path, monkeypatch, body, flag,
                                                               message):
    _module(tmp_path, monkeypatch, body)
    kind, name = flag[2:].split("=")
    with pytest.raises(ConfigError, match=re.escape(message)):
        core.run(_config(tmp_path, **{kind: (name,)}))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("changes, message", [
    (dict(train_actions=("my_actions",)), "--train_actions=my_actions: give MODULE:FUNCTION"),
    (dict(eval_actions=("a:b",), mode="train"),
     "--eval_actions run in --mode=train_and_eval or eval or continuous_eval; --mode=train runs"),
    (dict(train_actions=("a:b",), mode="eval"), "--train_actions run in --mode=train or"),
    (dict(eval_actions=("a:b",), mode="export"), "--mode=export runs none"),
])
def test_bad_action_flags(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(**changes)


def test_action_flags_from_the_command_line(tmp_path):
    proc = run_train(f"--model_dir={tmp_path / 'run'}", "--train_actions=a:b,c",
                     "--train_steps=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "train.py: error: --train_actions=c: give MODULE:FUNCTION, a function(step, metrics) in "
        "MODULE.py")
    assert not os.path.exists(tmp_path / "run")
