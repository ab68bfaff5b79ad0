"""Serving the registry's champion: the FastAPI app and the MLflow pyfunc model.

The module registers one champion built from the tiny embedded base plus two small LoRA
styles and one blend (random, non-zero weights so that each adapter visibly changes the
image), in a registry database created once for the module.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stunning.config import RegistryConfig
from stunning.serve import ServeSettings
from tests.factories import random_lora, seed_store

MODEL = "serve-test"
# These tests are about generation, not guarding it: no keys, no rate limit, no alias polling
# (tests/unit/test_serve_api.py covers keys, limits, the queue and the hot switch).
OPEN = ServeSettings(auth=False, rate_per_minute=0, poll_seconds=0)
REQUEST = {"prompt": "a red dress on a white background", "seed": 3, "steps": 2, "guidance_scale": 4.0}


def _make_adapters(base: Path, out: Path) -> dict[str, Path]:
    """Two style LoRAs and a blend in the train/merge layout, saved with the family API."""
    import torch

    from stunning.families import get_family

    pipe = get_family("sd3").load_pipeline(base, torch.device("cpu"), torch.float32)
    folders = {
        "impressionist": out / "adapters/impressionist",
        "noir": out / "adapters/noir",
        "half-half": out / "blends/half-half",
    }
    for seed, folder in enumerate(folders.values()):
        random_lora(pipe, folder, "sd3", seed, scale=0.5)
    return {"adapters": out / "adapters", "blends": out / "blends"}


@pytest.fixture(scope="module")
def champion(tmp_path_factory, tiny_base) -> Path:
    """A project root whose registry holds `serve-test` v1 as @champion; returns the root."""
    from stunning.registry import register_candidate

    root = seed_store(tmp_path_factory.mktemp("serve"))
    dirs = _make_adapters(tiny_base, root / "candidate")
    gate = {"passed": True, "checks": [], "reasons": [], "candidate": {}}
    result = register_candidate(RegistryConfig(model_name=MODEL), gate, dirs, tiny_base, "sd3", {}, root=root)
    assert result["promoted"] and result["version"] == 1
    return root


@pytest.fixture(scope="module")
def client(champion):
    from fastapi.testclient import TestClient

    from stunning.serve import create_app

    app = create_app(f"models:/{MODEL}@champion", RegistryConfig(model_name=MODEL), root=champion, device="cpu", settings=OPEN)
    with TestClient(app) as c:  # the context runs the lifespan, which loads the model
        yield c


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_health_names_the_served_model(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model_name"] == MODEL and body["version"] == 1
    assert body["alias"] == "champion" and body["device"] == "cpu"
    assert body["styles"] == ["impressionist", "noir"] and body["blends"] == ["half-half"]
    assert body["resolution"] == 32


def test_generate_returns_a_png_per_style_reproducibly(client):
    r = client.post("/generate", json={**REQUEST, "style": "noir"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-model-version"] == "1"
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "PNG" and image.size == (32, 32)
    noir = _pixels(r.content)

    again = client.post("/generate", json={**REQUEST, "style": "noir"})
    assert np.array_equal(_pixels(again.content), noir), "same request and seed must give the same image"
    base = _pixels(client.post("/generate", json=REQUEST).content)
    impressionist = _pixels(client.post("/generate", json={**REQUEST, "style": "impressionist"}).content)
    blend = _pixels(client.post("/generate", json={**REQUEST, "blend": "half-half"}).content)
    # Each adapter must actually be switched in (and out again for the plain base request).
    for other in (base, impressionist, blend):
        assert np.abs(other - noir).mean() > 1.0


def test_generate_json_when_asked(client):
    r = client.post("/generate", json={**REQUEST, "style": "impressionist"}, headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["width"] == body["height"] == 32 and body["style"] == "impressionist" and body["version"] == 1
    png = base64.b64decode(body["image_base64"])
    assert Image.open(io.BytesIO(png)).size == (32, 32)


def test_bad_requests_get_clear_errors(client):
    r = client.post("/generate", json={**REQUEST, "style": "cubism"})
    assert r.status_code == 400
    assert "unknown style 'cubism'" in r.json()["detail"] and "impressionist" in r.json()["detail"]
    r = client.post("/generate", json={**REQUEST, "blend": "nope"})
    assert r.status_code == 400 and "half-half" in r.json()["detail"]
    r = client.post("/generate", json={**REQUEST, "style": "noir", "blend": "half-half"})
    assert r.status_code == 400 and "not both" in r.json()["detail"]
    assert client.post("/generate", json={**REQUEST, "steps": 0}).status_code == 422
    assert client.post("/generate", json={"seed": 1}).status_code == 422


def test_no_champion_answers_503(champion, tmp_path):
    from fastapi.testclient import TestClient

    from stunning.serve import create_app

    # A registry without this model, and a project with no registry at all.
    for cfg, root in ((RegistryConfig(model_name="never-registered"), champion), (RegistryConfig(), tmp_path)):
        with TestClient(create_app(None, cfg, root=root, device="cpu", settings=OPEN)) as c:
            health = c.get("/health")
            assert health.status_code == 503 and "dvc repro" in health.json()["detail"]
            r = c.post("/generate", json=REQUEST)
            assert r.status_code == 503 and "dvc repro" in r.json()["detail"]
    assert not (tmp_path / "mlruns").exists()


def test_pyfunc_model_predicts_the_same_image_as_the_server(champion, client):
    import mlflow.pyfunc
    import pandas as pd

    from stunning.tracking import configure_mlflow

    configure_mlflow(RegistryConfig(model_name=MODEL), champion)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion", model_config={"device": "cpu"})
    out = model.predict([{**REQUEST, "style": "noir"}, {"prompt": "a blue hat", "blend": "half-half", "steps": 2}])
    assert isinstance(out, list) and len(out) == 2
    served = client.post("/generate", json={**REQUEST, "style": "noir"}).content
    assert np.array_equal(_pixels(base64.b64decode(out[0])), _pixels(served))
    assert Image.open(io.BytesIO(base64.b64decode(out[1]))).size == (32, 32)
    frame = model.predict(pd.DataFrame([{"prompt": "a green bag", "seed": 1, "steps": 2, "guidance_scale": 3}]))
    assert Image.open(io.BytesIO(base64.b64decode(frame[0]))).format == "PNG"


def test_champion_whose_external_base_is_gone_answers_503(champion, tiny_base, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from stunning.registry import register_candidate
    from stunning.serve import create_app

    base = shutil.copytree(tiny_base, tmp_path / "big-base")
    dirs = {"adapters": champion / "candidate/adapters"}
    cfg = RegistryConfig(model_name="serve-external")
    gate = {"passed": True, "checks": [], "reasons": []}
    register_candidate(cfg, gate, dirs, base, "sd3", {}, root=champion, base_copy_limit_mb=0)
    shutil.rmtree(base)
    with TestClient(create_app(None, cfg, root=champion, device="cpu", settings=OPEN)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and str(base) in r.json()["detail"] and "does not exist" in r.json()["detail"]


def test_concurrent_requests_keep_their_own_adapter(client):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{**REQUEST, "style": s} for s in ("noir", "impressionist")] + [REQUEST, {**REQUEST, "blend": "half-half"}]
    expected = [_pixels(client.post("/generate", json=b).content) for b in bodies]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda b: _pixels(client.post("/generate", json=b).content), bodies * 2))
    for i, image in enumerate(got):
        assert np.array_equal(image, expected[i % len(bodies)]), bodies[i % len(bodies)]


def _register_fresh(champion: Path, tiny_base: Path, model_name: str) -> tuple[RegistryConfig, Path]:
    """`model_name` v1 as @champion (the module's adapters); returns its config and noir adapter artifact."""
    from stunning.registry import model_artifacts, register_candidate, resolve

    cfg = RegistryConfig(model_name=model_name)
    dirs = {"adapters": champion / "candidate/adapters", "blends": champion / "candidate/blends"}
    gate = {"passed": True, "checks": [], "reasons": [], "candidate": {}}
    register_candidate(cfg, gate, dirs, tiny_base, "sd3", {}, root=champion)
    _, model_dir = resolve(cfg, root=champion)
    return cfg, model_artifacts(model_dir)["adapters"] / "noir" / "pytorch_lora_weights.safetensors"


def test_broken_champion_starts_degraded_and_reload_keeps_the_last_good_model(champion, tiny_base):
    from fastapi.testclient import TestClient

    from stunning.serve import create_app

    cfg, noir = _register_fresh(champion, tiny_base, "serve-broken")
    good = noir.read_bytes()
    noir.write_bytes(good[: len(good) // 2])  # a champion artifact cut short
    app = create_app(None, cfg, root=champion, device="cpu", settings=OPEN)
    with TestClient(app) as c:  # start-up must not crash
        health = c.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "degraded" and body["model"] == "models:/serve-broken@champion"
        assert str(noir) in body["error"] and "dvc repro register" in body["error"]
        r = c.post("/generate", json=REQUEST)
        assert r.status_code == 503 and str(noir) in r.json()["error"]

        noir.write_bytes(good)  # repaired: a reload swaps the model in
        assert app.state.reload() is True
        ok = c.get("/health").json()
        assert ok["status"] == "ok" and ok["error"] is None and ok["styles"] == ["impressionist", "noir"]
        assert c.post("/generate", json=REQUEST).status_code == 200

        noir.write_bytes(b"")  # broken again: the reload fails, the last good model keeps serving
        assert app.state.reload() is False
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert "still serving v1" in health.json()["error"] and "0 bytes" in health.json()["error"]
        r = c.post("/generate", json={**REQUEST, "style": "noir"})
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    noir.write_bytes(good)


def test_non_finite_numbers_get_422_with_an_encodable_body(client):
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        raw = f'{{"prompt": "a hat", "steps": 2, "guidance_scale": {literal}}}'
        r = client.post("/generate", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (literal, r.text)
        err = r.json()["detail"][0]
        assert err["loc"] == ["body", "guidance_scale"] and isinstance(err["input"], str)
    r = client.post("/generate", content='{"prompt": "a hat", "seed": NaN}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "seed"]


def test_error_bodies_never_echo_large_inputs(client):
    big = "x" * 50_000  # under the body limit, over every field limit
    for body in ({**REQUEST, "prompt": big}, {**REQUEST, "style": big}, {**REQUEST, "extra": big}, {"seed": 1, big[:1000]: 1}):
        r = client.post("/generate", json=body)
        assert r.status_code == 422 and len(r.content) < 3000, (len(r.content), list(body)[-1][:10])
    many = {f"k{i}": i for i in range(500)}
    r = client.post("/generate", json={**REQUEST, **many})
    assert r.status_code == 422 and len(r.json()["detail"]) == 20 and r.json()["omitted_errors"] == 480


def test_large_bodies_get_413_without_being_read(champion):
    from fastapi.testclient import TestClient

    from stunning.serve import create_app

    # No model needed: the limit applies before routing (this project has no such registry).
    with TestClient(create_app(None, RegistryConfig(model_name="never-registered"), root=champion, max_body_bytes=1024,
                               settings=OPEN)) as c:
        huge = b'{"prompt": "' + b"y" * 20_000_000 + b'"}'
        r = c.post("/generate", content=huge, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "1024 bytes" in r.json()["detail"] and len(r.content) < 200

        def chunks():  # no Content-Length: chunked, counted while read
            for _ in range(100):
                yield b"z" * 100

        r = c.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = c.post("/generate", json={"prompt": "small enough"})
        assert r.status_code == 503  # past the limit check, to the (missing) model
