"""DreamBooth: instance prompt with a trigger word, class images made once, prior preservation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from stunning.config import ConfigError, TrainConfig, load_params
from stunning.families import get_family
from stunning.training.dreambooth import class_images, instance_caption_fn, trigger_words
from stunning.training.samples import sample_prompt
from stunning.training.trainer import train_style
from tests.factories import RecordingTracker, make_curated, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    return make_curated(tmp_path_factory.mktemp("curated"), n_train=4, n_val=2)


def db_cfg(**kw) -> TrainConfig:
    base = {"steps": 6, "batch_size": 2, "checkpoint_every": 2, "learning_rate": 5e-3, "instance_prompt": "a photo in sks style",
            "class_prompt": "a photo", "prior_preservation": True, "num_class_images": 3, "class_sample_steps": 2}
    return tiny_train_config(**{**base, **kw})


def test_instance_prompt_replaces_or_wraps_captions():
    assert instance_caption_fn(TrainConfig()) is None
    fn = instance_caption_fn(TrainConfig(instance_prompt="a photo in sks style"))
    assert fn("a red dress") == "a photo in sks style"
    fn = instance_caption_fn(TrainConfig(instance_prompt="{caption}, in sks style"))
    assert fn("a red dress") == "a red dress, in sks style"


def test_the_instance_prompts_trigger_word_is_recorded():
    assert trigger_words(TrainConfig(trigger_words=["noir"])) == ["noir"]  # no instance prompt: as listed
    assert trigger_words(TrainConfig(instance_prompt="a photo in sks style")) == ["sks"]
    assert trigger_words(TrainConfig(instance_prompt="{caption}, in the style of ohwx")) == ["ohwx"]
    # The class prompt's words are not the trigger (DreamBooth's "a photo of sks dog" / "a photo of dog").
    assert trigger_words(TrainConfig(instance_prompt="a photo of sks dog", class_prompt="a photo of dog")) == ["sks"]
    # Listed and in the prompt: kept as listed; listed but not in the prompt: the prompt's trigger is added.
    assert trigger_words(TrainConfig(instance_prompt="a photo in sks style", trigger_words=["sks"])) == ["sks"]
    assert trigger_words(TrainConfig(instance_prompt="a photo in sks style", trigger_words=["noir"])) == ["noir", "sks"]
    # Only common words: the whole prompt is the trigger phrase.
    assert trigger_words(TrainConfig(instance_prompt="a photo, {caption}")) == ["a photo"]


def test_samples_are_prompted_like_the_training_images():
    assert sample_prompt(TrainConfig(), "noir") == "a red dress on a white background, noir style"
    cfg = TrainConfig(instance_prompt="{caption}, in sks style")
    assert sample_prompt(cfg, "noir") == "a red dress on a white background, in sks style"
    assert sample_prompt(TrainConfig(instance_prompt="a photo in sks style"), "noir") == "a photo in sks style"


def test_dreambooth_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="prior_preservation needs train.class_prompt"):
        TrainConfig(prior_preservation=True)
    with pytest.raises(ValueError, match="instance_prompt is empty"):
        TrainConfig(instance_prompt="  ")
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  prior_preservation: true\n")
    with pytest.raises(ConfigError, match="class_prompt"):
        load_params(params)


def test_class_images_are_generated_once_then_reused(tiny_sd_unet, tmp_path):
    fam = get_family("sd-unet")
    pipe = fam.load_pipeline(tiny_sd_unet, torch.device("cpu"), torch.float32)
    given = tmp_path / "given"
    given.mkdir()
    Image.fromarray(np.full((50, 40, 3), 200, np.uint8)).save(given / "mine.jpg")
    cfg = db_cfg(class_data_dir=str(given))
    paths = class_images(fam, pipe, tiny_sd_unet, cfg, (32, 32), tmp_path / "cache")
    assert len(paths) == 3 and paths[0].name == "given-mine.png"  # the user's image first, fitted
    assert all(Image.open(p).size == (32, 32) for p in paths)
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = class_images(fam, pipe, tiny_sd_unet, cfg, (32, 32), tmp_path / "cache")
    assert again == paths and [p.stat().st_mtime_ns for p in again] == stamps  # reused, not regenerated
    # Generated images come from the base model, seeded: a fresh folder gets the same pixels.
    fresh = class_images(fam, pipe, tiny_sd_unet, cfg, (32, 32), tmp_path / "elsewhere")
    assert np.array_equal(np.asarray(Image.open(fresh[1])), np.asarray(Image.open(paths[1])))
    # Another class prompt is another set.
    other = class_images(fam, pipe, tiny_sd_unet, db_cfg(class_prompt="a painting"), (32, 32), tmp_path / "cache")
    assert other[0].parent != paths[0].parent
    with pytest.raises(FileNotFoundError, match="class_data_dir"):
        class_images(fam, pipe, tiny_sd_unet, db_cfg(class_data_dir=str(tmp_path / "none")), (32, 32), tmp_path / "c")


@pytest.mark.parametrize("name", ["sd3", "sd-unet"])
def test_prior_preservation_trains_logs_both_losses_and_resumes_exactly(name, curated, tmp_path, request):
    base = request.getfixturevalue({"sd3": "tiny_base", "sd-unet": "tiny_sd_unet"}[name])
    cfg = db_cfg(target_modules=get_family(name).default_lora_targets)  # trigger_words left empty
    tracker = RecordingTracker()
    straight = train_style(base, name, curated, "noir", cfg, tmp_path / "a", tracker, tmp_path / "ck-a", "cpu",
                           sample_seeds=())
    logged = [m for m, _ in tracker.metrics if "prior_loss" in m]
    assert len(logged) == cfg.steps
    for m in logged:
        assert m["loss"] == pytest.approx(m["instance_loss"] + cfg.prior_loss_weight * m["prior_loss"], rel=1e-5)
    assert len(list((tmp_path / "ck-a" / "class-images").rglob("gen-*.png"))) == 3

    def crash(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_style(base, name, curated, "noir", cfg, tmp_path / "b", None, tmp_path / "ck-b", "cpu",
                    sample_seeds=(), on_step=crash)
    resumed = train_style(base, name, curated, "noir", cfg, tmp_path / "b", None, tmp_path / "ck-b", "cpu",
                          sample_seeds=())
    assert resumed["resumed_from_step"] == 2
    np.testing.assert_allclose(resumed["loss_history"], straight["loss_history"], rtol=1e-5, atol=1e-6)
    a = load_file(tmp_path / "a" / "noir" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "noir" / "pytorch_lora_weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    with safe_open(tmp_path / "a" / "noir" / "pytorch_lora_weights.safetensors", "pt") as fh:
        assert json.loads(fh.metadata()["stunning.trigger_words"]) == ["sks"]  # from the instance prompt

    # The prior term changes training: without it the same run ends elsewhere.
    plain = train_style(base, name, curated, "noir", cfg.model_copy(update={"prior_preservation": False, "steps": 2}),
                        tmp_path / "c", None, None, "cpu", sample_seeds=())
    assert plain["loss_history"] != straight["loss_history"][:2]


def test_batch_size_auto_counts_the_class_images(curated, tiny_base, tmp_path):
    summary = train_style(tiny_base, "sd3", curated, "noir", db_cfg(batch_size="auto", max_batch_size=4, steps=2),
                          tmp_path / "o", None, None, "cpu", sample_seeds=())
    assert 1 <= summary["batch_size"] <= 4


def test_prior_preservation_on_a_bucketed_set(tiny_base, tmp_path):
    from tests.factories import ShapeRecorder, make_bucketed

    root = make_bucketed(tmp_path / "set")
    fam = ShapeRecorder("sd3")
    tracker = RecordingTracker()
    # mixed_precision "no": no CPU calibration steps before the recorded training steps.
    train_style(tiny_base, fam, root, "noir", db_cfg(steps=4, mixed_precision="no"), tmp_path / "o", tracker,
                tmp_path / "ck", "cpu", sample_seeds=())
    # Class images are squares of the resolution; each step: one instance bucket, then the class batch.
    made = sorted((tmp_path / "ck" / "class-images").rglob("*.png"))
    assert [p.name for p in made] == [f"gen-{i:05d}.png" for i in range(3)]
    assert all(Image.open(p).size == (32, 32) for p in made)
    steps = fam.shapes[:8]
    assert [s[2:] for s in steps[1::2]] == [(16, 16)] * 4 and all(s[0] == 2 for s in steps)
    assert {s[2:] for s in steps[0::2]} <= {(16, 16), (12, 20), (20, 12)}
    assert len([m for m, _ in tracker.metrics if "prior_loss" in m and "instance_loss" in m]) == 4
