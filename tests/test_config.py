import pytest

from core import prepare
from core.config import Config
from core.errors import ConfigError

BAD = [
    (dict(dataset="mnist", cache="/tmp/cache"), r"^--cache=/tmp/cache keeps image files "
     r"decoded, but --dataset=mnist is held in memory already: drop --cache \(it is for folder"),
    (dict(cache="memory"), r"^--cache=memory keeps image files decoded, but --dataset=fontdigits"),
    (dict(mode="eval", tf_data_service="grpc://localhost:5050"), r"^--tf_data_service feeds "
     r"training; --mode=eval reads its data on this machine: drop --tf_data_service$"),
    (dict(strategy="default", num_cpu_devices=2),
     r"^--num_cpu_devices=2 splits the CPU for --strategy=mirrored \(or auto\), but "
     r"--strategy=default runs on one device of this machine: drop --num_cpu_devices"),
    (dict(strategy="one_device", num_cpu_devices=4), r"but --strategy=one_device runs on one"),
    (dict(strategy="multi_worker", num_cpu_devices=2), r"but --strategy=multi_worker runs on one"),
    (dict(dataset="imagenet"), r"--dataset='imagenet' is unknown: choose one of fontdigits"),
    (dict(dataset="folder:~/photos"),
     r"^--dataset='folder:~/photos': the path goes in its own flag: --dataset=folder "
     r"--data_dir=~/photos$"),
    (dict(dataset="tfrecord:gs://b/shards"),
     r"--dataset=tfrecord --data_dir=gs://b/shards$"),
    (dict(model="unet"), r"--model='unet' is unknown: choose one of seed"),
    (dict(batch_size=0), r"--batch_size=0: must be a positive"),
    (dict(batch_size=-4), r"--batch_size=-4: must be a positive"),
    (dict(epochs=0), r"--epochs=0: must be a positive"),
    (dict(epochs=None, train_steps=-1), r"--train_steps=-1"),
    (dict(epochs=3, train_steps=5), r"exactly one of --epochs and --train_steps"),
    (dict(learning_rate=0.0), r"--learning_rate=0.0: must be a positive"),
    (dict(learning_rate=float("nan")), r"--learning_rate=nan"),
    (dict(steps_per_loop=0), r"--steps_per_loop=0"),
    (dict(train_split="train[::2]"), r"--train_split='train\[::2\]'"),
    (dict(eval_split="test[::2]"), r"--eval_split='test\[::2\]'"),
    (dict(eager=True, jit_compile=True), r"--eager and --jit_compile"),
    (dict(encoder_filters=(8, 0)), r"--encoder_filters"),
    (dict(image_size=(64, 48, 3)), r"--image_size=64,48,3: give HEIGHT,WIDTH as two positive"),
    (dict(image_size=(0,)), r"--image_size=0: give HEIGHT,WIDTH"),
    (dict(dataset="folder", data_dir="/data/photos", cache="/data/photos/"),
     r"--cache=/data/photos/ is inside --data_dir=/data/photos: the cache's shards would land"),
    (dict(dataset="folder", data_dir="gs://b/photos", cache="gs://b/photos/cache"),
     r"--cache=gs://b/photos/cache is inside --data_dir=gs://b/photos"),
    (dict(dataset="folder", data_dir="/data/photos", model_dir="/data/photos/"),
     r"^--model_dir=/data/photos/ is --data_dir: the run would write its checkpoints, "
     r"TensorBoard events \(train/, eval/\) and figures among your data; give it a folder of "
     r"its own, e.g. --model_dir=runs/NAME$"),
    (dict(dataset="tfrecord", data_dir="gs://b/shards", model_dir="gs://b/shards"),
     r"^--model_dir=gs://b/shards is --data_dir"),
    (dict(dataset="folder", data_dir="runs/a/train/cats", model_dir="runs/a"),
     r"^--data_dir=runs/a/train/cats is inside --model_dir=runs/a's train/, where the run "
     r"writes its TensorBoard events"),
    (dict(model_dir="runs/[2023] photos"), r"^--model_dir='runs/\[2023\] photos': TensorFlow "
     r"reads a checkpoint's files back by a file pattern, in which '\[' is a pattern character"),
    (dict(init_checkpoint="runs/a[1]"), r"^--init_checkpoint='runs/a\[1\]': TensorFlow reads"),
    (dict(mode="eval", checkpoint="runs/a[1]/ckpt-6"), r"^--checkpoint='runs/a\[1\]/ckpt-6'"),
    (dict(data_dir="/data/photos"), r"^--data_dir=/data/photos is not read by "
     r"--dataset=fontdigits, which is built in: for your images add --dataset=folder"),
    (dict(dataset="synthetic", mode="train_and_eval", data_dir="x"), r"--dataset=synthetic"),
    (dict(checkpoint="runs/a/ckpt-20"), r"^--checkpoint=runs/a/ckpt-20 names what --mode=eval "
     r"and export read; --mode=train_and_eval resumes the newest checkpoint of --model_dir: to "
     r"start a run from its weights, give --init_checkpoint=runs/a/ckpt-20$"),
    (dict(mode="train", checkpoint="best"), r"^--checkpoint=best names what"),
    (dict(latent_dim=32), r"^--latent_dim=32 is the VAE's latent size; --model=seed does not "
     r"read it: drop --latent_dim, or use --model=vae$"),
    (dict(model="resnet", kl_weight=0.5), r"^--kl_weight=0.5 is the VAE's KL weight; "),
    (dict(model="vae", latent_channels=8), r"^--latent_channels=8 is the resnet's code channels; "
     r"--model=vae does not read it: drop --latent_channels, or use --model=resnet$"),
    (dict(model="denoiser", blocks_per_stage=2), r"^--blocks_per_stage=2 is the resnet's"),
    (dict(synthetic_shape=(8, 8, 3)), r"^--synthetic_shape=8,8,3 shapes --dataset=synthetic's "
     r"images; --dataset=fontdigits does not read it: drop it, or give --image_size \(and "
     r"--channels\) to resize these$"),
    (dict(model="mine:build", latent_dim=8), r"^--latent_dim=8 is the VAE's latent size; "
     r"--model=mine:build does not read it"),
]


def test_each_model_takes_its_own_flags():
    assert Config(model="vae", latent_dim=32, kl_weight=0.5).latent_dim == 32
    assert Config(model="resnet", latent_channels=8, blocks_per_stage=2).latent_channels == 8
    # Eval and export take the model from the run: a VAE run's --latent_dim is not refused
    # before its model is known.
    assert Config(mode="eval", latent_dim=32).latent_dim == 32


def test_eval_checks_the_data_dir_once_it_knows_the_runs_dataset():
    """The flags' default dataset is not yet the one eval runs on (the run's config.json
    gives it): Config leaves the check to the runner (test_modes.py runs it)."""
    assert Config(mode="eval", data_dir="/data/photos").data_dir == "/data/photos"


def test_a_cache_beside_the_images_is_fine(tmp_path):
    assert Config(dataset="folder", data_dir=str(tmp_path / "photos"),
                  cache=str(tmp_path / "photos-cache")).cache == str(tmp_path / "photos-cache")


@pytest.mark.parametrize("changes,message", BAD)
def test_bad_values_give_one_clear_line(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        Config(**changes)
    assert "\n" not in str(info.value)


def test_defaults_are_valid_and_frozen():
    config = Config()
    assert config.dataset == "fontdigits" and config.model == "seed"
    with pytest.raises(AttributeError):
        config.batch_size = 3  # frozen
    assert Config(**config.to_dict()) == config


def test_from_python_one_length_is_enough_and_a_new_one_replaces_the_old():
    # As on the command line: --train_steps alone needs no --epochs, the later one wins.
    assert (Config().epochs, Config().train_steps) == (5, None)
    assert (Config(train_steps=7).epochs, Config(train_steps=7).train_steps) == (None, 7)
    assert Config(epochs=2).train_steps is None
    by_steps = Config().replace(train_steps=9)
    assert (by_steps.epochs, by_steps.train_steps) == (None, 9)
    by_epochs = by_steps.replace(epochs=2)
    assert (by_epochs.epochs, by_epochs.train_steps) == (2, None)
    assert by_steps.replace(batch_size=8).train_steps == 9
    assert Config(**by_steps.to_dict()) == by_steps
    with pytest.raises(ConfigError, match="exactly one of --epochs and --train_steps"):
        by_steps.replace(epochs=2, train_steps=3)


def test_from_python_values_are_taken_as_the_flags_give_them():
    config = Config(image_size=64, encoder_filters=[8, 4, 4], decoder_filters=[4, 4, 8],
                    loss="l1+ssim", loss_weights=[0.2, 0.8], augment=["flip", "crop"],
                    train_actions="my_actions:log, my_actions:keep")
    assert config.image_size == (64, 64) and Config(image_size=[64, 48]).image_size == (64, 48)
    assert config.encoder_filters == (8, 4, 4) and config.loss_weights == (0.2, 0.8)
    assert config.augmentations == ("flip", "crop")
    assert config.train_actions == ("my_actions:log", "my_actions:keep")
    assert config == Config(**config.to_dict()) and hash(config) == hash(config.replace())


def test_a_leading_tilde_is_the_home_folder(monkeypatch, tmp_path):
    """`--data_dir=~/photos` reaches train.py as written: a shell expands ~ only at the start
    of a word."""
    monkeypatch.setenv("HOME", str(tmp_path))
    c = Config(dataset="folder", data_dir="~/photos", model_dir="~/runs/a",
               checkpoint="~/runs/b/ckpt-3", cache="~/cache", mode="eval")
    assert (c.data_dir, c.model_dir, c.checkpoint, c.cache) == tuple(
        str(tmp_path / p) for p in ("photos", "runs/a", "runs/b/ckpt-3", "cache"))
    assert Config(dataset="folder", data_dir="gs://b/~x", cache="memory").data_dir == "gs://b/~x"
    assert c.replace(mode="export").data_dir == str(tmp_path / "photos")


def test_one_image_size_number_is_a_square(tmp_path):
    assert Config(image_size=(64,)).image_size == (64, 64)
    assert Config(image_size=[48, 80]).image_size == (48, 80)  # as the flag parser gives it
    info = prepare.convert("synthetic", str(tmp_path), splits=["test[:4]"], image_size=["12"],
                           progress=None, shards=1)
    assert info["image_shape"] == [12, 12, 1]
