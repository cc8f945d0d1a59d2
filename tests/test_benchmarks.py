"""Smoke tests of the benchmark scripts with tiny settings: they run and write valid
reports with the expected keys. No speed is asserted here (benchmarks measure speed)."""

import json
import os
import sys

import pytest

from helpers import ROOT, run_script


def _run(script, *flags, timeout=400, env=None):
    proc = run_script(os.path.join("benchmarks", script), *flags, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def mnist_flags(idx_dir):
    return ["--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:1024]"]


def test_throughput_smoke(tmp_path, mnist_flags):
    """Variants of every worker setting: three worker processes taking turns (the
    deterministic one's XLA step compiles only with the max-pool by reshape)."""
    names = {"tf_function", "steps_per_loop_8", "mirrored_2cpu_32", "keras_fit_spe1",
             "sharded_device_32", "sharded_device_32_ungrouped", "keras_fit_spe32_per_core",
             "keras_fit_spe32_mirrored_per_core_as_written", "deterministic_32_xla"}
    proc = _run("throughput.py", *mnist_flags, f"--output_dir={tmp_path}", "--rounds=2",
                "--steps=2", "--warmup_steps=1", "--batch_size=32", "--peaks=false",
                f"--variants={','.join(sorted(names))}")
    assert "starting the 'default' worker" in proc.stdout
    assert "starting the 'per_core' worker" in proc.stdout
    assert "starting the 'deterministic' worker" in proc.stdout
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert set(report["results"]) == names
    for result in report["results"].values():
        assert {"median", "stderr", "jitter", "step_ms_p50", "step_ms_p90", "compile_seconds",
                "precision", "threads", "loop", "flops_per_sec"} <= set(result)
        assert result["median"] > 0 and result["rounds"] == len(result["per_round"]) == 2
    assert report["results"]["sharded_device_32"]["threads"] == "per_core"
    assert report["results"]["keras_fit_spe1"]["threads"] == "default"
    assert report["results"]["deterministic_32_xla"]["threads"] == "deterministic"
    assert report["headline"]["float32"]["keras"] in {
        "keras_fit_spe1", "keras_fit_spe32_per_core", "keras_fit_spe32_mirrored_per_core_as_written"}
    headline = report["headline"]["float32"]
    assert headline["keras_as_written"] == "keras_fit_spe32_mirrored_per_core_as_written"
    assert headline["ratio_as_written"] == pytest.approx(
        report["results"][headline["ours"]]["median"]
        / report["results"]["keras_fit_spe32_mirrored_per_core_as_written"]["median"])
    # 3x the forward convolutions (861,184 FLOPs), less the first one's input gradient.
    assert report["config"]["train_flops_per_example"] == 3 * 861_184 - 200_704
    assert "| `sharded_device_32` | float32 | per_core |" in (tmp_path / "throughput.md").read_text()
    # TensorFlow's records (MirroredStrategy's "Reduce to ...") print once, by absl's handler:
    # TensorFlow, imported before app.run, had given its logger a handler of its own too.
    assert "cross_device_ops.py" in proc.stderr and "INFO:tensorflow:" not in proc.stderr


def test_bad_input_is_one_line_with_its_exit_code_not_a_traceback(tmp_path):
    """A benchmark's own bad input, its worker's, and a train.py it runs: each one line
    saying what failed, and the exit code of the error (3: data)."""
    missing = tmp_path / "nope"
    for script, flags, lines in [
        ("throughput.py", ["--dataset=mnist", "--variants=tf_function", "--peaks=false"],
         [f"throughput.py: error: --data_dir={missing} is not a folder: give the folder that "
          "holds train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz",
          "throughput.py: error: the 'default' worker exited with code 3 (its error is above)"]),
        ("time_to_quality.py", ["--seeds=1"],
         [f"time_to_quality.py: error: train.py exited with code 3 before its first "
          f"evaluation: --data_dir={missing} is not a folder: give the folder that holds "
          "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"]),
        ("quality.py", ["--rows=seed"],
         [f"quality.py: error: training seed failed (exit code 3): --data_dir={missing} is not "
          "a folder: give the folder that holds t10k-images-idx3-ubyte.gz and "
          "t10k-labels-idx1-ubyte.gz"]),
    ]:
        proc = run_script(os.path.join("benchmarks", script), *flags, f"--data_dir={missing}",
                          f"--output_dir={tmp_path / 'out'}")
        assert proc.returncode == 3, proc.stderr[-3000:]
        assert [x for x in proc.stderr.splitlines() if ": error: " in x] == lines
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_that_does_not_build_or_a_count_below_one_is_one_line(tmp_path):
    """A --model that does not import was a traceback through the benchmark (its
    workers' too); a count of 0 (--steps=0) a TypeError deep in the report. Now the
    model's one line (exit 2), and absl's refusal of the flag (one line, exit 2, as
    train.py's)."""
    proc = run_script("benchmarks/conv_ceiling.py", "--model=nope", f"--output_dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [x for x in proc.stderr.splitlines() if ": error: " in x] == [
        "conv_ceiling.py: error: --model=nope: importing nope failed (ModuleNotFoundError: No "
        "module named 'nope'): put nope.py in the working directory or on PYTHONPATH, and fix "
        "what it raises"]
    proc = run_script("benchmarks/gpu_check.py", "--simulate_on_cpu", "--steps=0",
                      f"--output_dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (
        "gpu_check.py: error: flag --steps=0: 0 is not a positive integer (python "
        "benchmarks/gpu_check.py --helpshort lists the flags)")
    assert not list(tmp_path.iterdir())


def test_throughput_rejects_unknown_variants(tmp_path):
    """One line and exit 2, as a flag train.py refuses (absl's UsageError: a blank line,
    then the message, exit 1)."""
    proc = run_script("benchmarks/throughput.py", "--variants=warp_drive",
                      f"--output_dir={tmp_path}", "--peaks=false", "--dataset=synthetic")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith(
        "throughput.py: error: unknown variants ['warp_drive']: choose from [")
    assert not list(tmp_path.iterdir())


def test_conv_ceiling_smoke(tmp_path):
    _run("conv_ceiling.py", f"--output_dir={tmp_path}", "--iterations=2", "--repeats=1",
         "--dtypes=float32", "--batch_size=8")
    report = json.loads((tmp_path / "conv_ceiling.json").read_text())
    result = report["results"]["float32"]
    convs = result["convs"]
    assert [c["input"] for c in convs][:2] == [[28, 28, 1], [14, 14, 8]]  # the seed model
    assert "grad_input" not in convs[0] and "grad_input" in convs[1]  # the images need none
    for conv in convs:
        for op in ("forward", "grad_weights"):
            assert conv[op]["ms"] > 0 and conv[op]["fraction_of_core_peak"] > 0
    assert 0 < result["ceiling_fraction_of_peak"] and result["core_matmul_peak_flops"] > 0
    assert "| down0/conv | 28x28x1 | 8 | 4 |" in (tmp_path / "conv_ceiling.md").read_text()


def test_grouped_layout_smoke(tmp_path):
    _run("grouped_layout.py", f"--output_dir={tmp_path}",
         "--blocks=pool:1:8:4:4,up:4:4:1:4,upcrop:4:4:2:3,pool:8:4:32:3",
         "--batch_size=32", "--iterations=1", "--rounds=1")
    rows = json.loads((tmp_path / "grouped_layout.json").read_text())["results"]
    assert [r["kind"] for r in rows] == ["pool", "up", "upcrop", "pool"]
    assert [r["grouped_by_rule"] for r in rows] == [True, True, True, False]  # <= 16 filters
    assert all(set(r["ms"]) == {"ordinary", "grouped"} and min(r["ms"].values()) > 0 for r in rows)
    assert "| pool | 8x8x1 | 4 | 4 |" in (tmp_path / "grouped_layout.md").read_text()


@pytest.mark.parametrize("entry,message", [("8x14", "expected kind:cin:size:filters:kernel"),
                                           ("dense:8:14:4:4", "unknown kind 'dense'")])
def test_grouped_layout_rejects_bad_entries(tmp_path, entry, message):
    proc = run_script("benchmarks/grouped_layout.py", f"--blocks={entry}",
                      f"--output_dir={tmp_path}")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_grouped_layout_without_onednn_is_one_line(tmp_path):
    """Where oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0; the benchmarks turn it on otherwise),
    the grouped layout cannot run: one line that names the setting to change, exit 2,
    nothing written."""
    proc = run_script("benchmarks/grouped_layout.py", "--blocks=pool:1:8:4:4",
                      f"--output_dir={tmp_path}", env={"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "grouped_layout.py: error: the grouped layout needs oneDNN's convolutions "
        "(TensorFlow's own have no grouped convolution gradient), and this process has them "
        "off (TF_ENABLE_ONEDNN_OPTS=0, or a TensorFlow without oneDNN): unset "
        "TF_ENABLE_ONEDNN_OPTS or set it to 1")
    assert not list(tmp_path.iterdir())  # nothing written


def test_loss_forms_smoke(tmp_path):
    """The script also checks that the three forms agree (value and gradient) before timing."""
    _run("loss_forms.py", f"--output_dir={tmp_path}", "--batch_size=16", "--iterations=1",
         "--rounds=1")
    rows = json.loads((tmp_path / "loss_forms.json").read_text())["results"]
    assert [r["form"] for r in rows] == ["tensorflow", "per_example_custom_gradient",
                                         "sum_and_gradient"]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    assert "| `sum_and_gradient` |" in (tmp_path / "loss_forms.md").read_text()


def test_op_profile_smoke(tmp_path):
    _run("op_profile.py", f"--output_dir={tmp_path}", "--steps=2", "--batch_size=16",
         "--batch_shards=2", "--report_name=profile")
    report = json.loads((tmp_path / "profile.json").read_text())
    ops, summary = report["ops"], report["summary"]
    # Two shards, each running the model's 7 forward convolutions (oneDNN's fused
    # conv+bias op on x86, plain Conv2D elsewhere).
    forward = [o["per_step"] for op, o in ops.items()
               if "conv2d" in op.lower() and "backprop" not in op.lower()]
    assert sum(forward) == 14, ops
    assert ops["ResourceApplyAdam"]["per_step"] == 14  # one fused update per variable
    assert summary["op_ms_per_step"] > 0 and summary["wall_ms_per_step_traced"] > 0
    assert sum(summary["ops_at_once_share"].values()) == pytest.approx(1.0, abs=1e-6)
    assert report["alone_ms_per_step"] and "ran alone" in (tmp_path / "profile.md").read_text()
    assert any("encoder/down0/" in node for node in report["nodes"])
    assert "| op type | per step | ms per step |" in (tmp_path / "profile.md").read_text()


def test_throughput_skips_a_variant_the_batch_cannot_divide_over(tmp_path, mnist_flags):
    """A batch of 31 cannot be split over the 2 replicas of a mirrored variant: it is skipped
    with the reason in the log and the report, and the others run."""
    proc = _run("throughput.py", *mnist_flags, f"--output_dir={tmp_path}", "--rounds=1",
                "--steps=2", "--warmup_steps=1", "--batch_size=31", "--peaks=false",
                "--variants=tf_function,mirrored_2cpu_32")
    why = "--batch_size=31 does not divide evenly over 2 replica(s): use a multiple of 2"
    assert f"skipping mirrored_2cpu_32: {why}" in proc.stdout
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert set(report["results"]) == {"tf_function"}
    assert report["skipped"] == {"mirrored_2cpu_32": why}
    assert f"Skipped `mirrored_2cpu_32`: {why}." in (tmp_path / "throughput.md").read_text()


def test_throughput_names_its_report_by_the_model(tmp_path, mnist_flags):
    """Another model's run writes throughput_MODEL, not over the seed model's report. Its
    worker, which exits by os._exit, leaves none of AutoGraph's temporary files (it left
    five a run in the temporary dir)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    _run("throughput.py", *mnist_flags, f"--output_dir={tmp_path}", "--rounds=1", "--steps=2",
         "--warmup_steps=1", "--peaks=false", "--model=keras_blog",
         "--variants=tf_function,keras_fit_spe1", env={"TMPDIR": str(temp)})
    report = json.loads((tmp_path / "throughput_keras_blog.json").read_text())
    assert report["config"]["model"] == "keras_blog"
    assert set(report["results"]) == {"tf_function", "keras_fit_spe1"}
    assert not (tmp_path / "throughput.json").exists()
    assert not list(temp.glob("__autograph_generated_file*"))


def test_input_pipeline_smoke(tmp_path, mnist_flags):
    _run("input_pipeline.py", *mnist_flags, f"--output_dir={tmp_path}", "--batches=3",
         "--train_steps=2", "--rounds=2", "--batch_size=32")
    report = json.loads((tmp_path / "input_pipeline.json").read_text())
    assert set(report["results"]) == {"tf_data", "tf_data_distributed", "on_device", "training"}
    assert report["results"]["training"]["multiple_of_training"] == pytest.approx(1.0)


def test_time_to_quality_smoke(tmp_path, idx_dir):
    """Both recipes as whole processes on two splits: tapeloop's through train.py with the
    flag file (extra flags reach it: the first evaluation is at step 7; --dataset, also a
    flag of the benchmark's, was refused as "--extra_flags has no value"), the tutorial's
    through Keras fit; each stops at the first evaluation at or under the target. The
    killed processes leave none of AutoGraph's temporary files (each left a few)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    _run("time_to_quality.py", f"--data_dir={idx_dir}", f"--output_dir={tmp_path}",
         "--target=0.6", "--max_seconds=150", "--seeds=1",
         "--extra_flags=--eval_every=7,--dataset=mnist",
         "--splits=test[:2000]:test[9000:],test[2000:4000]:test[:500]", env={"TMPDIR": str(temp)})
    assert not list(temp.rglob("__autograph_generated_file*"))
    report = json.loads((tmp_path / "time_to_quality.json").read_text())
    # A flag of the script's own name in --extra_flags=... is train.py's, given after `=`.
    assert report["config"]["recipe_flags"][-2:] == ["--eval_every=7", "--dataset=mnist"]
    roles = {}
    for key, entry in report["results"].items():
        roles[entry["role"]] = key
        for name in ("tapeloop", "tutorial"):
            run = entry["runs"][name][0]
            assert 0 < run["seconds"] < 150 and run["final_bce"] <= 0.6
            assert entry["summary"][name]["reached"] == 1
        assert entry["runs"]["tapeloop"][0]["curve"][0][1] == 7  # steps, from the log line
        assert entry["runs"]["tutorial"][0]["curve"][0][1] == 1  # epochs
        assert entry["median_fraction"] > 0
    assert roles == {"tuning": "test[:2000] -> test[9000:]",
                     "held_out": "test[2000:4000] -> test[:500]"}
    assert (tmp_path / "time_to_quality.png").stat().st_size > 10_000
    assert "| held_out: test[2000:4000] -> test[:500] |" in (
        tmp_path / "time_to_quality.md").read_text()


def test_time_to_quality_stops_at_a_recipe_that_cannot_run_and_keeps_its_report(tmp_path,
                                                                                 idx_dir):
    """A recipe train.py refuses (a batch that does not divide over the replicas, as on 3
    GPUs) stops the benchmark with train.py's own reason, one line and its exit code; the
    last report stays. It wrote a report of failures over it (with a --data_dir that does
    not exist, every row "not reached")."""
    report = tmp_path / "time_to_quality.md"
    report.write_text("the last run's table")
    proc = run_script("benchmarks/time_to_quality.py", f"--data_dir={idx_dir}",
                      f"--output_dir={tmp_path}", "--seeds=1", "--contenders=tapeloop",
                      "--splits=test[:2000]:test[9000:]",
                      "--extra_flags=--strategy=mirrored,--num_cpu_devices=2,--batch_size=31")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [x for x in proc.stderr.splitlines() if ": error: " in x] == [
        "time_to_quality.py: error: train.py exited with code 2 before its first evaluation: "
        "--batch_size=31 does not divide evenly over 2 replicas: use a multiple of 2, e.g. "
        "--batch_size=30 or --batch_size=32"]
    assert sorted(os.listdir(tmp_path)) == ["time_to_quality.md"]
    assert report.read_text() == "the last run's table"


def test_quality_smoke(tmp_path, idx_dir):
    """One row trained; a row of an earlier report that did not run now stays, dated."""
    earlier = {"config": "configs/quality_vae.cfg", "model": "vae", "noise_factor": 0.0,
               "epochs": "30", "bce": 0.0951, "mse": 0.0104, "psnr": 20.62, "ssim": 0.884,
               "seconds": 94.0, "published": "-", "dataset": "mnist"}
    (tmp_path / "quality.json").write_text(json.dumps(
        {"context": {"date": "2026-01-02"}, "results": {
            "vae": earlier, "seed": earlier,
            "gone": {**earlier, "config": "configs/quality_gone.cfg"}}}))
    _run("quality.py", "--rows=seed", f"--data_dir={idx_dir}", "--extra_flags=--epochs=1",
         f"--runs_dir={tmp_path / 'runs'}",
         f"--output_dir={tmp_path}")
    report = json.loads((tmp_path / "quality.json").read_text())
    row = report["results"]["seed"]
    assert row["config"] == "configs/quality_seed.cfg" and row["model"] == "seed"
    assert 0 < row["bce"] < 0.7 and row["psnr"] > 5 and row["seconds"] > 0
    assert row["date"] != "2026-01-02" and row["extra_flags"] == ["--epochs=1"]
    assert report["results"]["vae"] == {**earlier, "date": "2026-01-02"}
    assert "gone" not in report["results"]  # its config no longer exists
    markdown = (tmp_path / "quality.md").read_text()
    assert "| [seed](configs/quality_seed.cfg) |" in markdown
    assert "| [vae](configs/quality_vae.cfg) | vae | 0 | 30 | 0.0951 |" in markdown
    assert "Rows kept from an earlier run of this script: vae (2026-01-02)." in markdown
    assert "Rows run with --extra_flags, not as their config reads: seed (--epochs=1)." in markdown


def test_image_files_and_resume_cost_smoke(tmp_path):
    """Generates a few real JPEG/PNG files and shards, times every path, then resumes."""
    _run("image_files.py", f"--output_dir={tmp_path}", f"--work_dir={tmp_path / 'files'}",
         "--num_images=24", "--batch_size=4", "--batches=1", "--train_steps=1", "--rounds=1")
    report = json.loads((tmp_path / "image_files.json").read_text())
    assert {"folder_jpeg", "folder_png", "tfrecord_jpeg", "tfrecord_prepared", "keras_jpeg",
            "keras_png", "train_in_memory", "train_from_folder_jpeg", "tfrecord_prepared_raw",
            "train_from_tfrecord_prepared_raw", "train_from_folder_jpeg_cached",
            "jpeg_decode_only", "jpeg_decode_only_per_file",
            "folder_jpeg_resized"} <= set(report["results"])
    assert report["cache_first_pass_s"] > 0
    assert all(r["median"] > 0 for r in report["results"].values())
    quality = report["jpeg_downscale"]
    assert 0 < quality["mean_abs_diff"] < 10 and quality["psnr_db"] > 25
    assert "folder_jpeg / keras_jpeg" in (tmp_path / "image_files.md").read_text()
    assert "jpeg_decode_only / keras_jpeg" in report["ratios"]
    shards = tmp_path / "files" / "tfrecord_prepared-24"
    _run("resume_cost.py", f"--output_dir={tmp_path}", f"--data_dir={shards}",
         "--batch_size=4", "--repeats=1")
    resume = json.loads((tmp_path / "resume_cost.json").read_text())
    assert resume["steps_per_epoch"] == 6 and resume["iterator_state"]["bytes"] > 0


def test_eval_loop_smoke(tmp_path):
    """Both variants on a split of 130 batches (the loop's: the first alone, then calls of 64,
    64 and 1) and one of 2 batches: the same metrics (the script checks), and the report's
    rows with what the loop's trace costs and saves."""
    _run("eval_loop.py", f"--output_dir={tmp_path}", "--eval_split=test[:520]",
         "--eval_batch_sizes=4,300", "--rounds=1", "--repeats=1")
    report = json.loads((tmp_path / "eval_loop.json").read_text())
    assert [(r["eval_batch_size"], r["batches"]) for r in report["rows"]] == [(4, 130), (300, 2)]
    assert all(r["loop_later_s"][0] > 0 and r["per_batch_later_s"][0] > 0 for r in report["rows"])
    assert all({"loop_trace_s", "saving_per_batch_ms", "pays_after_calls"} <= set(r)
               for r in report["rows"])
    text = (tmp_path / "eval_loop.md").read_text()
    assert "| 4 | 130 | " in text and "(`EVAL_CALLS_BEFORE_LOOP`)" in text


def test_eval_loop_between_two_workers_smoke(tmp_path):
    """--workers=2: each variant timed in a cluster of two processes started for it, which
    agree on the metrics; the report names the multi-worker constant."""
    _run("eval_loop.py", f"--output_dir={tmp_path}", "--workers=2", "--eval_split=test[:40]",
         "--eval_batch_sizes=2", "--rounds=1", "--repeats=1")
    report = json.loads((tmp_path / "eval_loop_2_workers.json").read_text())
    assert report["workers"] == 2 and [r["batches"] for r in report["rows"]] == [20]
    text = (tmp_path / "eval_loop_2_workers.md").read_text()
    assert "2 workers of one cluster" in text and "_MULTI_WORKER`" in text
    assert "--workers=2" in text and not (tmp_path / "eval_loop.json").exists()
    # A worker's bad input: its one line, through the script's, and the other worker ended.
    proc = run_script(os.path.join("benchmarks", "eval_loop.py"), "--workers=2",
                      "--eval_split=nope[:3]", f"--output_dir={tmp_path / 'bad'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [x for x in proc.stderr.splitlines() if ": error: " in x] == [
        "eval_loop.py: error: worker 0 failed (exit code 2): split 'nope[:3]': unknown split "
        "'nope', choose from train, test"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "bad").exists()


def test_folder_check_smoke(tmp_path):
    """Every thread count, cached and evicted, against the default in the same round."""
    _run("folder_check.py", f"--output_dir={tmp_path}", "--files=40", "--rounds=1",
         "--threads=1,32")
    report = json.loads((tmp_path / "folder_check.json").read_text())
    default = report["default_threads"]
    assert set(report["files_per_s"]) == {f"{c} {n}" for c in ("cached", "evicted")
                                          for n in sorted({1, 32, default})}
    assert all(r["median"] > 0 for r in report["files_per_s"].values())
    assert report["vs_default"][f"evicted {default}"]["median"] == 1.0
    assert f"| {default} (default) |" in (tmp_path / "folder_check.md").read_text()


def test_signal_stress_smoke(tmp_path):
    """Three Ctrl-Cs at the seed's random moments of an eval's start: each ends with the
    one line and code 130, the checkpoints unchanged and the lock released."""
    _run("signal_stress.py", f"--output_dir={tmp_path}", "--runs=3", "--busy=1", "--name=s")
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["outcomes"]["one line, code 130"] == 3, report
    assert report["checkpoints_unchanged"] == 3 and report["lock_released"] == 3
    assert "| one line, code 130 | 3 |" in (tmp_path / "s.md").read_text()


def test_signal_stress_python_smoke(tmp_path):
    """--python: two Ctrl-Cs at an evaluation run from Python (a notebook's cell) raise
    KeyboardInterrupt at a safe point, and the same process evaluates again."""
    _run("signal_stress.py", f"--output_dir={tmp_path}", "--runs=2", "--busy=0", "--python",
         "--name=p")
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["outcomes"]["KeyboardInterrupt at a safe point"] == 2, report
    assert report["checkpoints_unchanged"] == 2 and report["evaluated_again"] == 2


def test_gpu_check_without_a_gpu_and_simulated(tmp_path):
    """Without a GPU it runs the CPU checks, says so and exits 0; --simulate_on_cpu runs
    every GPU path (on 2 logical CPUs) and the Keras comparison, and reads the placement log."""
    plain = _run("gpu_check.py", f"--output_dir={tmp_path / 'plain'}")
    assert "No GPU found: only the checks above ran" in plain.stdout
    report = json.loads((tmp_path / "plain" / "gpu_check.json").read_text())
    assert report["gpus"] == 0 and report["ok"] and report["paths"] == []
    assert len(report["checks"]) >= 9 and all(c["ok"] for c in report["checks"])
    _run("gpu_check.py", f"--output_dir={tmp_path / 'sim'}", "--simulate_on_cpu", "--steps=4",
         "--steps_per_loop=2", "--batch_size=16")
    report = json.loads((tmp_path / "sim" / "gpu_check.json").read_text())
    ran = [p for p in report["paths"] if "skipped" not in p]
    assert report["simulated"] and report["ok"] and len(ran) == 7
    assert all(p["placed"] > 0 and p["agrees"] and p["keras_steps_per_sec"] > 0 for p in ran)
    text = (tmp_path / "sim" / "gpu_check.md").read_text()
    assert "Simulated on 2 logical CPU devices" in text
    # Keras fit drops XLA under op determinism and, with "auto", under MirroredStrategy: the
    # report says so where it did, and not where fit compiled with XLA.
    rows = {r["name"]: r for r in ran}
    assert not rows["1 GPU, deterministic, XLA (max-pool by reshape)"]["keras_xla"]
    assert rows["1 GPU, XLA"]["keras_xla"] and not rows["1 GPU, float32"]["keras_xla"]
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[4] for line in text.splitlines()
             if line.startswith("| 1 GPU") or line.startswith("| 2 GPUs")}
    assert cells["1 GPU, deterministic, XLA (max-pool by reshape)"].endswith(", no XLA)")
    assert cells["2 GPUs mirrored, XLA, float32"].endswith(", no XLA)")
    assert not cells["1 GPU, XLA"].endswith("no XLA)")
    assert "Keras fit ran without XLA where its cell says `no XLA`" in text


def test_the_peak_says_how_it_was_measured():
    """A float32 'peak' on Ampere GPUs is TF32's unless TF32 is off: the report says which,
    and the matrix size."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from benchmarks import common

    context = {"device": "NVIDIA A100", "device_type": "GPU", "cpu_cores": 8, "tensorflow": "2.21",
               "keras": "3", "date": "2026-11-29", "matmul_peak_flops": {"float32": 1.5e14},
               "matmul_peak_method": {"n": 8192, "matmuls_per_sync": 16, "tf32": True}}
    text = common.context_markdown(context)
    assert "Measured matmul peak (8192x8192): float32 150,000 GFLOP/s (float32 as TF32" in text
    context["matmul_peak_method"]["tf32"] = False
    assert "(TF32 off)" in common.context_markdown(context)


def test_a_report_says_the_cpus_vector_units_and_whether_onednn_ran():
    """A CPU table's rates differ 1.3-3x by oneDNN on an AVX2 CPU (README, "oneDNN on every
    x86 CPU"): the Machine line says which, and a GPU's says no oneDNN state."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from benchmarks import common

    context = {"device": "AMD EPYC", "device_type": "CPU", "cpu_cores": 2, "tensorflow": "2.21",
               "keras": "3", "date": "2026-12-04", "cpu_features": ["avx2"], "onednn": True}
    assert common.context_markdown(context).startswith(
        "Machine: AMD EPYC (CPU, 2 cores; AVX2, no AVX-512; oneDNN on), TensorFlow 2.21")
    context.update(cpu_features=["avx2", "avx512f", "avx512_bf16"], onednn=False)
    assert "(CPU, 2 cores; AVX2, AVX-512, AVX512-BF16; oneDNN off)" in \
        common.context_markdown(context)
    context.update(device_type="GPU", cpu_features=None, onednn=None)
    assert "(GPU, 2 cores), TensorFlow" in common.context_markdown(context)


def test_ssim_forms_smoke(tmp_path):
    """The script checks that both SSIM forms agree before timing them."""
    _run("ssim_forms.py", f"--output_dir={tmp_path}", "--shapes=4x28x28x1,2x16x12x3", "--rounds=1")
    rows = json.loads((tmp_path / "ssim_forms.json").read_text())["results"]
    assert len(rows) == 8 and {r["form"] for r in rows} == {"tf.image.ssim", "core.metrics.ssim"}
    assert all(r["min_ms"] <= r["ms"] <= r["max_ms"] for r in rows)
    text = (tmp_path / "ssim_forms.md").read_text()
    assert "| 2x16x12x3 | value and gradient | `core.metrics.ssim` |" in text
    # The tests run oneDNN on (conftest), and a benchmark leaves a set variable alone.
    cpu = json.loads((tmp_path / "ssim_forms.json").read_text())["context"]
    assert cpu["onednn"] is True and "oneDNN on)" in text.splitlines()[2]


def test_norm_forms_smoke(tmp_path):
    """The script checks that both GroupNorm+SiLU forms agree before timing them."""
    _run("norm_forms.py", f"--output_dir={tmp_path}", "--shapes=2x8x6x16,3x4x4x8", "--rounds=1")
    rows = json.loads((tmp_path / "norm_forms.json").read_text())["results"]
    assert len(rows) == 4 and {r["form"] for r in rows} == {"plain", "fast_forms.norm_silu"}
    assert all(r["min_ms"] <= r["ms"] <= r["max_ms"] for r in rows)
    assert "| 3x4x4x8 | `fast_forms.norm_silu` |" in (tmp_path / "norm_forms.md").read_text()


def test_decode_forms_smoke(tmp_path):
    """Both forms of a chunk's decodes, for a folder of JPEGs and for TFRecord shards of
    PNGs, and both reads of the figures' examples of the shards, timed; the script writes
    no report unless each pair gave the same pixels."""
    _run("decode_forms.py", f"--output_dir={tmp_path}", f"--work_dir={tmp_path / 'work'}",
         "--num_images=64", "--rounds=1", "--batches=1")
    rows = json.loads((tmp_path / "decode_forms.json").read_text())["results"]
    assert {(r["source"], r["form"]) for r in rows} == {
        (source, form) for source in ("folder of JPEGs", "TFRecord of PNGs")
        for form in ("k traced copies", "traced once")}
    for r in rows:
        for stat in ("ready_s", "build_s", "images_per_sec"):
            assert len(r[stat]["rounds"]) == 1 and r[stat]["min"] <= r[stat]["median"] <= r[stat]["max"]
    assert len(list((tmp_path / "work" / "jpeg-64" / "train" / "all").iterdir())) == 64
    text = (tmp_path / "decode_forms.md").read_text()
    assert "| TFRecord of PNGs | traced once |" in text and "| 1.00x |" in text
    reads = json.loads((tmp_path / "decode_forms.json").read_text())["figure_examples"]
    assert [r["form"] for r in reads] == ["one pipeline (TFRecordSource.examples)",
                                          "each record eagerly"]
    assert "The figures' examples: 64 spread over the TFRecord split" in text


def test_iterator_teardown_smoke(tmp_path):
    """Every pipeline, strategy and autotuning case is read and its iterator deleted and
    timed, each round."""
    _run("iterator_teardown.py", f"--output_dir={tmp_path}", "--rounds=2", "--train_life=0",
         "--eval_split=test[:256]", "--train_steps=2")
    rows = json.loads((tmp_path / "iterator_teardown.json").read_text())["results"]
    assert {(r["pipeline"], r["strategy"], r["autotune"]) for r in rows} == {
        (p, s, a) for p in ("eval", "train") for s in ("default", "mirrored, 2 devices")
        for a in ("autotune on", "autotune off")}
    for r in rows:
        assert len(r["delete_s"]) == len(r["read_s"]) == r["rounds"] == 2
        assert r["delete_max_s"] >= r["delete_median_s"] >= 0 and r["read_median_s"] > 0
        assert 0 <= r["stalls"] <= 2 and r["stalls"] == sum(d > 0.1 for d in r["delete_s"])
    text = (tmp_path / "iterator_teardown.md").read_text()
    assert "| eval | mirrored, 2 devices | autotune off |" in text


def test_upsample_forms_smoke(tmp_path):
    """The script checks that the three upsample+conv forms agree before timing them, with
    and without XLA."""
    for xla in ("--nojit_compile", "--jit_compile"):
        _run("upsample_forms.py", f"--output_dir={tmp_path}", "--shapes=2x4x6x8x16",
             "--rounds=1", xla)
    for name in ("upsample_forms", "upsample_forms_xla"):
        rows = json.loads((tmp_path / f"{name}.json").read_text())["results"]
        assert [r["form"] for r in rows] == ["plain", "folded", "phases"]
        assert all(r["min_ms"] <= r["ms"] <= r["max_ms"] for r in rows)
        assert "| 2x4x6x8x16 | `phases` |" in (tmp_path / f"{name}.md").read_text()


def test_few_filter_forms_smoke(tmp_path):
    """The script checks that the plain and transposed few-filter convs agree before timing
    them, in float32 and bfloat16."""
    for precision in ("float32", "bfloat16"):
        _run("few_filter_forms.py", f"--output_dir={tmp_path}", "--shapes=2x6x4x16x3",
             "--rounds=1", f"--precision={precision}")
    for name in ("few_filter_forms", "few_filter_forms_bfloat16"):
        rows = json.loads((tmp_path / f"{name}.json").read_text())["results"]
        assert [r["form"] for r in rows] == ["plain", "transposed"]
        assert all(r["min_ms"] <= r["ms"] <= r["max_ms"] for r in rows)
        assert "| 2x6x4x16x3 | `transposed` |" in (tmp_path / f"{name}.md").read_text()


def test_jpeg_at_size_picks_the_highest_quality_that_fits():
    """The reference codec of the colour table, on real JPEG encodes of shapes images."""
    import numpy as np
    import tensorflow as tf

    from benchmarks import common
    from core import shapes

    images = shapes.build(seed=3, sizes={"train": 1, "test": 6})["test"][0]
    small, large = common.jpeg_at_size(images, 900), common.jpeg_at_size(images, 3000)
    assert small["fit"] == large["fit"] == 6
    assert small["mean_bytes"] <= 900 and large["mean_bytes"] <= 3000
    assert large["psnr"] > small["psnr"] + 2 and large["quality_min"] > small["quality_max"]
    # "Highest": one quality step more would not fit, for every image.
    for image in images:
        fits = [q for q in range(1, 101) if len(tf.io.encode_jpeg(image, quality=q).numpy()) <= 900]
        over = len(tf.io.encode_jpeg(image, quality=max(fits) + 1).numpy())
        assert over > 900 and small["quality_min"] <= max(fits) <= small["quality_max"]
    assert np.isfinite(small["ssim"]) and 0 < small["mse"] < large["mse"] * 10
    nothing = common.jpeg_at_size(images, 100)  # below any JPEG's headers
    assert nothing["fit"] == 0 and "psnr" not in nothing


def test_quantize_stores_each_number_in_the_given_bits():
    """Each channel's range in 2^bits - 1 steps: at most half a step from the float inside
    the range, clipped outside it, the range's ends exact, at most 2^bits values a channel."""
    import numpy as np

    from benchmarks import common

    rng = np.random.default_rng(0)
    train = rng.normal(size=(500, 4, 4, 3)).astype(np.float32) * [1.0, 5.0, 0.1]
    low, high = common.code_ranges(train)
    np.testing.assert_allclose(low, train.min(axis=(0, 1, 2)))
    codes = rng.normal(size=(50, 4, 4, 3)).astype(np.float32) * [1.0, 5.0, 0.1]
    inside = np.clip(codes, low, high)
    for bits in (8, 4):
        q = common.quantize(codes, low, high, bits)
        step = (high - low) / (2 ** bits - 1)
        assert np.all(np.abs(q - inside) <= step / 2 + 1e-6)
        for c in range(3):
            assert len(np.unique(q[..., c])) <= 2 ** bits
    ends = common.quantize(np.stack([low, high])[:, None, None, :], low, high)
    np.testing.assert_allclose(ends[:, 0, 0], np.stack([low, high]), rtol=1e-6)


def test_jpeg_smallest_is_quality_1_with_optimised_tables():
    """Real encodes: the smallest files are no larger than quality 1's standard ones, and
    decode to a worse image than a larger budget gives."""
    import numpy as np
    import tensorflow as tf

    from benchmarks import common
    from core import shapes

    images = shapes.build(seed=3, sizes={"train": 1, "test": 6})["test"][0]
    smallest = common.jpeg_smallest(images)
    standard = [len(tf.io.encode_jpeg(image, quality=1).numpy()) for image in images]
    assert smallest["images"] == 6 and smallest["mean_bytes"] < np.mean(standard)
    assert smallest["min_bytes"] > 100  # headers and tables
    assert 10 < smallest["psnr"] < common.jpeg_at_size(images, 3000)["psnr"]


def test_quality_colour_row_smoke(tmp_path):
    """A colour row: trained on shapes, its code size parsed from the run, JPEG beside it."""
    _run("quality.py", "--rows=colour_seed", f"--runs_dir={tmp_path / 'runs'}",
         f"--output_dir={tmp_path}", "--extra_flags=--epochs=1,--train_split=train[:256],"
         "--eval_split=test[:32]")
    assert not (tmp_path / "quality.json").exists()  # no MNIST row ran: that report is untouched
    row = json.loads((tmp_path / "quality_colour.json").read_text())["results"]["colour_seed"]
    assert row["code"] == "8x8x4" and row["code_bits"] == 8 * 8 * 4 * 32
    assert row["jpeg"]["images"] == 32 and row["jpeg"]["budget_bytes"] == 1024
    assert row["jpeg"]["fit"] > 0 and row["jpeg"]["mean_bytes"] <= 1024
    # 8-bit codes through the exported SavedModel: 256 bytes, about the float32 quality;
    # no JPEG file is that small, even at quality 1 with optimised tables.
    eight = row["eight_bit"]
    assert eight["bytes"] == 256 and eight["bits"] == 8 * 256
    assert abs(eight["psnr"] - row["psnr"]) < 1.0 and 0 < eight["ssim"] <= 1
    assert eight["jpeg"]["fit"] == 0 and eight["jpeg_smallest"]["min_bytes"] > 256
    assert "| colour_seed | 256 |" in (tmp_path / "quality_colour.md").read_text()
    text = (tmp_path / "quality_colour.md").read_text()
    assert "against JPEG" in text and "| [colour_seed](configs/quality_colour_seed.cfg) | seed |" in text


def test_flop_count_finds_the_resnets_nested_convolutions():
    """The resnet is not built from layers/blocks.py: its Conv2Ds are found by recording
    one forward pass, each on the grid it ran on."""
    import tensorflow as tf

    from benchmarks import common
    from layers.autoencoders import build_autoencoder

    model = build_autoencoder("resnet", (32, 32, 3))
    convs = common.conv_layers(model, (32, 32, 3))
    expected = [layer for layer in model._flatten_layers(include_self=False)  # noqa: SLF001
                if isinstance(layer, tf.keras.layers.Conv2D)]
    assert len(convs) == len(expected) > 10
    first = convs[0]
    assert first["input"] == [32, 32, 3] and first["kernel"] == 3
    assert first["flops"] == 2 * 32 * 32 * 3 * 3 * 3 * first["filters"]
    down = next(c for c in convs if c["name"].endswith("stage0_down"))
    assert down["input"][:2] == [16, 16]  # a stride-2 conv counts on its output grid
    total = sum(c["flops"] for c in convs)
    assert common.train_flops_per_example(model, (32, 32, 3)) == 3 * total - first["flops"]
    assert model(tf.zeros((1, 32, 32, 3))).shape == (1, 32, 32, 3)  # the calls are restored


def test_as_written_models_compute_in_no_faster_form():
    """The benchmarks' `as_written` model is the layers as they read; the default one is in
    the forms train.py chooses."""
    from benchmarks import common

    assert common.build_model("resnet", (32, 32, 3), as_written=True).encoder.forms is None
    assert common.build_model("resnet", (32, 32, 3)).encoder.forms.norm_act
    without = common.build_model("resnet", (32, 32, 3), without=("subpixel",))
    assert without.decoder.forms.norm_act and not without.decoder.forms.subpixel
