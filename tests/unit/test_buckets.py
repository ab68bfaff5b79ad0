"""Aspect-ratio buckets: sizes, ingest into the nearest bucket, batches from one bucket, exact resume.

Also that every family trains on non-square latents, and that mixed sizes are only accepted
from a set curated with buckets.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stunning.config import ConfigError, DataConfig, load_params
from stunning.data.images import bucket_resize, bucket_sizes
from stunning.families import get_family
from stunning.training.dataset import CuratedDataset, DatasetError
from stunning.training.encoding import check_bucket_sizes, size_multiple
from stunning.training.trainer import train_style
from tests.factories import ShapeRecorder, make_bucketed, read_curated, tiny_train_config, write_curated

TINY = {"sd3": "tiny_base", "sd-unet": "tiny_sd_unet", "sdxl": "tiny_sdxl", "flux": "tiny_flux"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("res", "step", "ratio"), [(1024, 64, 2.0), (512, 64, 1.5), (32, 8, 2.0)])
def test_bucket_sizes_keep_area_step_and_ratio(res, step, ratio):
    sizes = bucket_sizes(res, step, ratio)
    assert (res, res) in sizes and len(sizes) == len(set(sizes)) >= 3
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert w * h <= res * res
        assert max(w / h, h / w) <= ratio + 1e-9
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)  # landscape and portrait
    with pytest.raises(ValueError, match="bucket step"):
        bucket_sizes(32, 64)


def test_bucket_step_larger_than_the_resolution_is_a_config_error(tmp_path):
    DataConfig(resolution=32, bucket_step=64)  # fine while buckets are off (the shipped default)
    (tmp_path / "params.yaml").write_text("data:\n  resolution: 32\n  buckets: true\n  bucket_step: 64\n")
    with pytest.raises(ConfigError, match=r"data.bucket_step=64 is larger than data.resolution=32"):
        load_params(tmp_path / "params.yaml")


def test_an_image_goes_to_the_bucket_nearest_its_aspect():
    sizes = bucket_sizes(1024, 64)
    for w, h in [(3000, 2000), (2000, 3000), (1000, 1000), (4000, 1000)]:
        out = bucket_resize(Image.new("RGB", (w, h)), sizes)
        best = min(abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in sizes)
        assert abs(math.log(out.width / out.height) - math.log(w / h)) == pytest.approx(best)
        assert out.size in sizes


def test_ingest_with_buckets_writes_bucket_sizes(tmp_path):
    from stunning.data.ingest import ingest, read_manifest

    raw = tmp_path / "raw" / "noir"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(90, 60), (60, 90), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(raw / f"p{i}.png")
        (raw / f"p{i}.txt").write_text("a photo of a dress")
    cfg = DataConfig(source="local", raw_dir=str(tmp_path / "raw"), styles=["noir"], resolution=32, min_size=24,
                     buckets=True, bucket_step=8)
    ingest(tmp_path / "raw", tmp_path / "ingested", cfg)
    sizes = {(r["width"], r["height"]) for r in read_manifest(tmp_path / "ingested")}
    assert sizes == {(40, 24), (24, 40), (32, 32)}
    assert "bucket_step: 8" in (tmp_path / "ingested" / "data_config.yaml").read_text()
    # The curation stage's data-quality suite accepts bucket sizes (and only those).
    from stunning.config import CurateConfig
    from stunning.data.curate import curate

    result = curate(tmp_path / "ingested", tmp_path / "curated", cfg,
                    CurateConfig(min_resolution=24, val_fraction=0.0, min_images_per_style=1, min_caption_words=2))
    assert result.passed, result.problems
    # ...and the trainer accepts the curated set's mixed sizes (recorded as bucketed).
    assert "bucket_step: 8" in (tmp_path / "curated" / "curate_config.yaml").read_text()
    # val_fraction 0 keeps every image in train (no val split at all).
    assert CuratedDataset(tmp_path / "curated", "noir", "val", allow_empty=True).rows == []
    assert sorted(CuratedDataset(tmp_path / "curated", "noir", "train").buckets()) == [(24, 40), (32, 32), (40, 24)]


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory) -> Path:
    return make_bucketed(tmp_path_factory.mktemp("bucketed"))


def test_mixed_sizes_only_from_a_bucketed_set(tmp_path):
    root = make_bucketed(tmp_path / "set")
    assert sorted(CuratedDataset(root, "noir").buckets()) == [(24, 40), (32, 32), (40, 24)]
    (root / "curate_config.yaml").unlink()  # a hand-made or stale set: sizes differ by accident
    with pytest.raises(DatasetError, match=r"different sizes \(24x40, 32x32, 40x24\).*data.buckets: true"):
        CuratedDataset(root, "noir")
    # Recorded as bucketed, but with a step whose buckets do not include 40x24 and 24x40.
    (root / "curate_config.yaml").write_text("data:\n  resolution: 32\n  buckets: true\n  bucket_step: 16\n"
                                             "  bucket_max_ratio: 2.0\n")
    with pytest.raises(DatasetError, match=r"24x40, 40x24, which are not buckets of data.resolution=32"):
        CuratedDataset(root, "noir")


@pytest.mark.parametrize("name", list(TINY))
def test_every_family_trains_on_non_square_latents(name, request):
    fam = get_family(name)
    pipe = fam.load_pipeline(request.getfixturevalue(TINY[name]), torch.device("cpu"), torch.float32)
    assert size_multiple(fam, pipe) == 4  # VAE factor 2 x patch 2 (sd3), x 2x2 packing (flux), 2 x 2 (UNets)
    cond = fam.encode_prompts(pipe, ["a hat", "a dress"])
    for w, h in [(40, 24), (24, 40)]:
        latents = fam.encode_images(pipe, torch.rand(2, 3, h, w) * 2 - 1, torch.Generator().manual_seed(0))
        assert latents.shape[2:] == (h // 2, w // 2)
        loss = fam.training_loss(pipe, latents, cond, torch.Generator().manual_seed(0),
                                 scheduler=fam.noise_scheduler(pipe))
        assert loss.ndim == 0 and torch.isfinite(loss)
    check_bucket_sizes(fam, pipe, [(40, 24), (32, 32)], "set")
    with pytest.raises(DatasetError, match=r"30x32 are not multiples of 4.*data.bucket_step"):
        check_bucket_sizes(fam, pipe, [(30, 32), (32, 32)], "set")


def test_training_refuses_buckets_the_model_cannot_take(tiny_base, tmp_path):
    root = make_bucketed(tmp_path / "set")
    # Step 6: 30x30 and 36x24 are buckets of 32 px, but the model needs multiples of 4 (30 is not).
    (root / "curate_config.yaml").write_text("data:\n  resolution: 32\n  buckets: true\n  bucket_step: 6\n"
                                             "  bucket_max_ratio: 2.0\n")
    items = read_curated(root)
    write_curated(root, [item._replace(image=item.image.resize([(30, 30), (36, 24)][i % 2]))
                         for i, item in enumerate(items)])
    with pytest.raises(DatasetError, match=r"size\(s\) 30x30 are not multiples of 4, which the sd3 model needs"):
        train_style(tiny_base, "sd3", root, "noir", tiny_train_config(steps=1), tmp_path / "o", None, None, "cpu",
                    sample_seeds=())


@pytest.mark.parametrize("name", ["sd3", "sd-unet"])
def test_a_bucketed_set_trains_with_one_bucket_per_batch(name, bucketed, tmp_path, request):
    base = request.getfixturevalue({"sd3": "tiny_base", "sd-unet": "tiny_sd_unet"}[name])
    fam = ShapeRecorder(name)
    cfg = tiny_train_config(steps=10, batch_size=2, learning_rate=5e-3, target_modules=fam.default_lora_targets)
    summary = train_style(base, fam, bucketed, "noir", cfg, tmp_path / "out", None, None, "cpu", sample_seeds=())
    assert summary["val_loss"] is not None
    train_shapes = fam.shapes[:10]  # the 10 steps (val evaluation follows)
    assert len({s[2:] for s in train_shapes}) >= 2  # several buckets were drawn...
    assert all(s[0] == 2 for s in train_shapes)  # ...each batch whole, from one bucket (a mix could not stack)
    assert {s[2:] for s in fam.shapes} <= {(16, 16), (12, 20), (20, 12)}


def test_bucketed_runs_resume_exactly(bucketed, tiny_base, tmp_path):
    cfg = tiny_train_config(steps=8, batch_size=2, checkpoint_every=4, learning_rate=5e-3, caption_dropout=0.2)
    straight = train_style(tiny_base, "sd3", bucketed, "noir", cfg, tmp_path / "a", None, tmp_path / "ck-a", "cpu",
                           sample_seeds=())

    def crash(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_style(tiny_base, "sd3", bucketed, "noir", cfg, tmp_path / "b", None, tmp_path / "ck-b", "cpu",
                    sample_seeds=(), on_step=crash)
    resumed = train_style(tiny_base, "sd3", bucketed, "noir", cfg, tmp_path / "b", None, tmp_path / "ck-b", "cpu",
                          sample_seeds=())
    assert resumed["resumed_from_step"] == 4
    np.testing.assert_allclose(resumed["loss_history"], straight["loss_history"], rtol=1e-5, atol=1e-6)
    a = load_file(tmp_path / "a" / "noir" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "noir" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_bucket_histogram_is_logged(bucketed, tiny_base, tmp_path):
    from tests.factories import RecordingTracker

    tracker = RecordingTracker()
    train_style(tiny_base, "sd3", bucketed, "noir", tiny_train_config(steps=2, batch_size=2), tmp_path / "o", tracker, None,
                "cpu", sample_seeds=())
    assert tracker.params["buckets"] == {"24x40": 2, "32x32": 2, "40x24": 2}
