"""See and ship it: TensorBoard through its own server, --mode=eval against NumPy,
SavedModel export loaded in a fresh process, figures, the profiler, the progress line."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import matplotlib.image
import numpy as np
import pytest
import tensorflow as tf

import core
from core import controller, data
from core.config import Config
from helpers import run_train
from layers.autoencoders import build_autoencoder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, idx_dir):
    """A finished tiny train_and_eval run on real MNIST."""
    root = tmp_path_factory.mktemp("runs")
    config = Config(dataset="mnist", data_dir=idx_dir, train_split="test[:1024]",
                    eval_split="test[9000:9300]", model_dir=str(root / "tiny"), batch_size=32,
                    train_steps=40, epochs=None, log_every=10, eval_every=20, strategy="default",
                    learning_rate=3e-3, profile_steps=(3, 6))
    core.run(config)
    return config


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _get(url, body=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as response:
        return json.loads(response.read())


def test_tensorboard_server_shows_scalars_images_and_hparams(trained):
    logdir = os.path.dirname(trained.model_dir)
    # A sibling model dir with another learning rate: the HParams table compares the two.
    core.run(dataclasses.replace(trained, model_dir=os.path.join(logdir, "tiny_lr"),
                                 learning_rate=1e-3, train_steps=4, eval_every=4,
                                 profile_steps=None))
    sessions = {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN"], "colParams": [],
                "startIndex": 0, "sliceSize": 10}
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}", "--host=127.0.0.1",
         f"--port={port}", "--load_fast=false"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                scalars = _get(f"{base}/data/plugin/scalars/tags")
                if "tiny/eval" in scalars and "tiny/train" in scalars:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not serve the run in time"
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        assert {"loss", "examples_per_sec", "learning_rate", "step_time_ms", "grad_norm",
                "compile_seconds"} <= set(scalars["tiny/train"])
        assert {"loss", "mse", "psnr", "ssim"} <= set(scalars["tiny/eval"])
        images = _get(f"{base}/data/plugin/images/tags")
        assert "reconstructions" in images["tiny/eval"]
        texts = _get(f"{base}/data/plugin/text/tags")
        assert "config" in texts["tiny/train"]
        # The sibling run is read after the first: wait for its session too.
        while len(_get(f"{base}/data/plugin/hparams/session_groups", sessions)
                   ["sessionGroups"]) < 2:
            assert time.monotonic() < deadline, "TensorBoard did not serve both runs in time"
            time.sleep(0.5)
        experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        infos = {h["name"]: h for h in experiment["hparamInfos"]}
        assert {"learning_rate", "batch_size", "model"} <= set(infos)
        # Typed, with the domains of both runs, and what differs between them marked
        # (the dashboard filters and sorts by these; one run's config would set none).
        assert infos["learning_rate"]["type"] == "DATA_TYPE_FLOAT64"
        assert infos["learning_rate"]["domainInterval"] == pytest.approx(
            {"minValue": 1e-3, "maxValue": 3e-3})
        assert infos["learning_rate"]["differs"]
        assert infos["model"]["type"] == "DATA_TYPE_STRING"
        assert infos["model"]["domainDiscrete"] == ["seed"] and not infos["model"]["differs"]
        metrics = {(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]}
        assert {("eval", "loss"), ("eval", "psnr"), ("train", "loss")} <= metrics
        groups = _get(f"{base}/data/plugin/hparams/session_groups", sessions)
        assert groups["totalSize"] == 2
        session = [g for g in groups["sessionGroups"] if g["name"] == "tiny"][0]
        assert session["hparams"]["learning_rate"] == pytest.approx(3e-3)
        values = {(m["name"]["group"], m["name"]["tag"]): m["value"] for m in session["metricValues"]}
        assert 0 < values[("eval", "loss")] < 0.7  # the final eval BCE
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_profiler_trace_is_written(trained):
    traces = tf.io.gfile.glob(os.path.join(trained.model_dir, "train", "plugins", "profile", "*",
                                           "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000


def test_figures_are_written(trained):
    for name, min_width in (("reconstructions.png", 600), ("curves.png", 400),
                            ("latent_space.png", 400), ("interpolation.png", 600)):
        image = matplotlib.image.imread(os.path.join(trained.model_dir, name))
        assert image.shape[1] >= min_width, name
        assert image[..., :3].std() > 0.05, f"{name} is blank"


def _numpy_ssim(x, y):
    """SSIM per image as tf.image.ssim defines it (11x11 Gaussian, sigma 1.5, 'valid')."""
    size, sigma, c1, c2 = 11, 1.5, 0.01**2, 0.03**2
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g /= g.sum()

    def blur(a):  # (N, H, W) -> (N, H-10, W-10), separable valid convolution
        a = np.stack([a[:, i:i + a.shape[1] - size + 1] for i in range(size)], -1) @ g
        return np.stack([a[:, :, j:j + a.shape[2] - size + 1] for j in range(size)], -1) @ g

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return ssim.mean(axis=(1, 2))


def test_eval_mode_matches_numpy(trained, idx_dir):
    result = core.run(trained.replace(mode="eval", profile_steps=None))
    saved = json.load(open(os.path.join(trained.model_dir, "eval_results.json")))
    assert saved["step"] == result["step"] == 40
    model = build_autoencoder("seed")
    tf.train.Checkpoint(model=model).restore(
        tf.train.latest_checkpoint(trained.model_dir)).expect_partial()
    images = data.to_float(data.load_split("test[9000:9300]", "mnist", idx_dir).images).numpy()
    logits = model(images).numpy().astype(np.float64)
    x = images.astype(np.float64)
    bce = (np.maximum(logits, 0) - logits * x + np.log1p(np.exp(-np.abs(logits)))).mean(axis=(1, 2, 3))
    recon = 1 / (1 + np.exp(-logits))
    mse = ((recon - x) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(1 / mse)
    ssim = _numpy_ssim(x[..., 0], recon[..., 0])
    np.testing.assert_allclose(saved["bce"], bce.mean(), rtol=1e-5)
    np.testing.assert_allclose(saved["mse"], mse.mean(), rtol=1e-4)
    np.testing.assert_allclose(saved["psnr"], psnr.mean(), rtol=1e-4)
    np.testing.assert_allclose(saved["ssim"], ssim.mean(), rtol=1e-3)


LOADER = """
import json, sys
import numpy as np
import tensorflow as tf
assert "core" not in sys.modules and "layers" not in sys.modules
loaded = tf.saved_model.load(sys.argv[1])
batch = np.load(sys.argv[2])
out = {}
for n in (1, 7):
    images = loaded.signatures["reconstruct"](images=tf.constant(batch[:n]))["images"].numpy()
    code = loaded.signatures["encode"](images=tf.constant(batch[:n]))["code"]
    decoded = loaded.signatures["decode"](code=code)["images"].numpy()
    out[n] = {"reconstruct": images.tolist(), "decoded": decoded.tolist(), "code": code.shape.as_list()}
# On a device: the three signatures through TensorFlow Lite's converter and interpreter.
converter = tf.lite.TFLiteConverter.from_saved_model(
    sys.argv[1], signature_keys=["encode", "decode", "reconstruct"])
lite = tf.lite.Interpreter(model_content=converter.convert())
code = lite.get_signature_runner("encode")(images=batch)["code"]
out["lite"] = {"reconstruct": lite.get_signature_runner("reconstruct")(images=batch)["images"].tolist(),
               "decoded": lite.get_signature_runner("decode")(code=code)["images"].tolist()}
print(json.dumps(out))
"""


def test_export_loads_in_a_fresh_process(trained, idx_dir, tmp_path):
    result = core.run(trained.replace(mode="export", profile_steps=None))
    export_dir = result["export_dir"]
    assert export_dir == os.path.join(trained.model_dir, "export", "40")
    batch = data.to_float(data.load_split("test[:7]", "mnist", idx_dir).images).numpy()
    np.save(tmp_path / "batch.npy", batch)
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    proc = subprocess.run([sys.executable, str(script), export_dir, str(tmp_path / "batch.npy")],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    model = build_autoencoder("seed")
    tf.train.Checkpoint(model=model).restore(
        tf.train.latest_checkpoint(trained.model_dir)).expect_partial()
    for n in ("1", "7"):
        expected = model.reconstruct(batch[: int(n)]).numpy()
        assert np.max(np.abs(np.array(out[n]["reconstruct"]) - expected)) <= 1e-5
        assert np.max(np.abs(np.array(out[n]["decoded"]) - expected)) <= 1e-5
        assert out[n]["code"] == [int(n), 4, 4, 4]
    for key in ("reconstruct", "decoded"):  # TensorFlow Lite's, of the whole batch
        assert np.max(np.abs(np.array(out["lite"][key]) - model.reconstruct(batch).numpy())) <= 1e-5
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--dir", export_dir, "--all"], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for signature in ("encode", "decode", "reconstruct"):
        assert f"signature_def['{signature}']" in shown.stdout
    assert "shape: (-1, 28, 28, 1)" in shown.stdout and "shape: (-1, 4, 4, 4)" in shown.stdout
    # `saved_model_cli run` loads as TF Serving does (a graph and a session, the variables
    # restored by the SavedModel's own restore op), not through tf.saved_model.load.
    ran = subprocess.run([cli, "run", "--dir", export_dir, "--tag_set", "serve",
                          "--signature_def", "reconstruct",
                          "--inputs", f"images={tmp_path / 'batch.npy'}",
                          "--outdir", str(tmp_path / "cli"), "--overwrite"],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    served = np.load(tmp_path / "cli" / "images.npy")
    assert np.max(np.abs(served - model.reconstruct(batch).numpy())) <= 1e-5
    # Each weight once, under the model's names.
    stored = dict(tf.train.list_variables(os.path.join(export_dir, "variables", "variables")))
    stored.pop("_CHECKPOINTABLE_OBJECT_GRAPH")
    assert sum(int(np.prod(shape)) for shape in stored.values()) == model.count_params()
    assert any("seed.Sencoder.Sdown0" in name for name in stored), sorted(stored)


def test_export_without_a_checkpoint_is_one_line(tmp_path):
    proc = run_train("--mode=export", f"--model_dir={tmp_path}", "--dataset=synthetic")
    assert proc.returncode == 2
    assert "--mode=export found no checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_progress_line_and_plain_logs_off_a_terminal(tmp_path):
    line = controller.progress_line(1200, 4680, 0.0931, 10450.0, 83)
    assert line.startswith("[") and "1200/4680 | loss 0.0931 | 10,450 ex/s | 1m23s left" in line
    assert controller.format_duration(3725) == "1h02m"
    assert not controller.Progress(stream=open(os.devnull, "w")).enabled
    proc = run_train(f"--model_dir={tmp_path}", "--dataset=synthetic", "--train_steps=6",
                     "--log_every=3", "--batch_size=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "train | step 6/6" in proc.stderr


def test_wide_grids_wrap(tmp_path):
    from core import plots

    rows = [np.random.default_rng(0).random((40, 28, 28, 1)).astype(np.float32)] * 2
    path = plots.reconstruction_grid(str(tmp_path / "grid.png"), rows, ["in", "out"], "40")
    image = matplotlib.image.imread(path)
    assert image.shape[1] <= 2200  # 16 columns at most
    assert image.shape[0] > 3 * 2 * 100  # 3 bands of 2 rows
    wrapped, labels = plots.wrap_rows(rows, ["in", "out"])
    assert len(wrapped) == 6 and labels == ["in", "out"] * 3
    np.testing.assert_array_equal(wrapped[2][:8], rows[0][16:24])
    assert not wrapped[4][8:].any()  # the last band padded with blanks


def test_a_long_title_stays_inside_every_figure(tmp_path):
    """A long model and split name wraps onto more lines instead of running off the figure:
    the outermost pixel columns stay white."""
    from core import plots

    title = ("codes of 2000 images (PCA), my_experiments.autoencoders:make_wide on "
             "tfds:celeb_a/aligned train[95%:], step 123456")
    rng = np.random.default_rng(0)
    two = [rng.random((2, 28, 28, 1)).astype(np.float32)] * 2
    paths = [plots.reconstruction_grid(str(tmp_path / "grid.png"), two, ["in", "out"], title),
             plots.training_curves(str(tmp_path / "curves.png"), [(1, 0.5), (2, 0.4)],
                                   [(2, 0.45)], title),
             plots.latent_space(str(tmp_path / "latent.png"), rng.random((12, 8)),
                                np.arange(12) % 2, title),
             plots.interpolation_strip(str(tmp_path / "strip.png"), two[0].repeat(2, 0), title)]
    for path in paths:
        image = matplotlib.image.imread(path)[..., :3]
        assert image[:, :2].min() == 1.0 and image[:, -2:].min() == 1.0, path


def test_a_resume_with_another_loss_names_both_on_the_curves(tmp_path):
    """train/loss changes meaning where a resumed run changes --loss: each start names its
    loss in train/ (a text summary), and the curves figure names them in turn."""
    from core import plots, summaries

    config = Config(dataset="fontdigits", train_split="train[:640]", eval_split="test[:64]",
                    model_dir=str(tmp_path / "run"), train_steps=10, batch_size=32,
                    eval_every=10, log_every=5, loss="l1+ssim", loss_weights=(0.16, 0.84))
    core.run(config)
    core.run(config.replace(train_steps=20, loss="bce", loss_weights=None))
    core.run(config.replace(train_steps=30, loss="bce", loss_weights=None))
    named = summaries.read_texts(str(tmp_path / "run" / "train"), "loss_function")
    assert named == [(0, "0.16 L1 + 0.84 (1 - SSIM)"), (10, "BCE"), (20, "BCE")]
    changes = plots.loss_changes(named)
    assert changes == [(0, "0.16 L1 + 0.84 (1 - SSIM)"), (10, "BCE")]
    assert plots.loss_label("BCE", changes) == "0.16 L1 + 0.84 (1 - SSIM), then BCE after step 10"
    assert plots.loss_label("BCE", plots.loss_changes([(0, "BCE"), (10, "BCE")])) == "BCE"
    image = matplotlib.image.imread(str(tmp_path / "run" / "curves.png"))
    assert image[..., :3].std() > 0.05
