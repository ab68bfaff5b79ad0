"""The studio API around generation: keys, rate limits, the job queue, streaming, metrics and
the hot switch between registry versions, on a real tiny registered model.

Where a test needs the single worker busy at a known moment, it submits a job of its own to
the app's runner whose step callback waits on an event (the served model drawing for real),
so queue-full, channel and in-flight cases do not depend on timing.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stunning.config import RegistryConfig
from stunning.serve import ServeSettings, UnsafeBindError, check_bind, run_server
from tests.factories import random_lora, seed_store

MODEL = "api-test"
REQUEST = {"prompt": "a red dress", "seed": 5, "steps": 2, "style": "noir"}
OPEN = ServeSettings(auth=False, rate_per_minute=0, poll_seconds=0)


def _adapters(base: Path, out: Path, seed: int) -> dict[str, Path]:
    import torch

    from stunning.families import get_family

    pipe = get_family("sd3").load_pipeline(base, torch.device("cpu"), torch.float32)
    random_lora(pipe, out / "adapters/noir", "sd3", seed, scale=0.5)
    return {"adapters": out / "adapters"}


def _register(root: Path, base: Path, cfg: RegistryConfig, candidate: dict[str, Path]) -> int:
    from stunning.registry import register_candidate

    gate = {"passed": True, "checks": [], "reasons": [], "candidate": {}}
    result = register_candidate(cfg, gate, candidate, base, "sd3", {}, root=root)
    assert result["promoted"], result
    return result["version"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base) -> dict:
    """A registry holding `api-test` v1 (one style, `noir`) as @champion, and a second set of
    adapters (other weights) for the hot-switch test to register as v2."""
    root = seed_store(tmp_path_factory.mktemp("api"))
    first = _adapters(tiny_base, root / "first", seed=1)
    second = _adapters(tiny_base, root / "second", seed=2)
    assert _register(root, tiny_base, RegistryConfig(model_name=MODEL), first) == 1
    return {"root": root, "base": tiny_base, "first": first, "second": second}


def _app(project: dict, settings: ServeSettings = OPEN, model: str = MODEL):
    from stunning.serve import create_app

    return create_app(None, RegistryConfig(model_name=model), root=project["root"], device="cpu", settings=settings)


def _client(app):
    from fastapi.testclient import TestClient

    return TestClient(app)


def _hold_worker(app) -> tuple[threading.Event, object]:
    """Occupy the app's one worker with a real drawing that waits at its first step."""
    from stunning.style_model import GenerateRequest

    state = app.state.server
    model, gate, started = state.model, threading.Event(), threading.Event()

    def draw(req, on_step):
        def step(i, total, latents):
            started.set()
            gate.wait(30)
            on_step(i, total, latents)

        return model.generate_images(req, on_step=step)

    job = state.jobs.submit(GenerateRequest(prompt="hold", steps=2), draw=draw)
    assert started.wait(30)
    return gate, job


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_generation_needs_a_key_probes_and_docs_do_not(project, tmp_path):
    settings = ServeSettings(keys_path=tmp_path / "keys.json", rate_per_minute=0, poll_seconds=0)
    app = _app(project, settings)
    with _client(app) as c:
        r = c.post("/generate", json=REQUEST)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert "stunning keys create" in r.json()["detail"]
        r = c.post("/generate/stream", json=REQUEST, headers={"Authorization": "Bearer stn_wrong"})
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
        for path in ("/health", "/ready", "/metrics", "/docs", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        assert "HTTPBearer" in c.get("/openapi.json").json()["components"]["securitySchemes"]

        record, key = app.state.keys.create("test")
        auth = {"Authorization": f"Bearer {key}"}
        r = c.post("/generate", json=REQUEST, headers=auth)
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"
        app.state.keys.revoke(record.id)  # as `stunning keys revoke` would, meanwhile
        assert c.post("/generate", json=REQUEST, headers=auth).status_code == 401


def test_a_key_over_its_rate_gets_429_with_retry_after(project, tmp_path):
    settings = ServeSettings(keys_path=tmp_path / "keys.json", rate_per_minute=1, burst=2, poll_seconds=0)
    app = _app(project, settings)
    with _client(app) as c:
        keys = [{"Authorization": f"Bearer {app.state.keys.create(n)[1]}"} for n in ("a", "b")]
        assert [c.post("/generate", json=REQUEST, headers=keys[0]).status_code for _ in range(2)] == [200, 200]
        r = c.post("/generate", json=REQUEST, headers=keys[0])
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert "1 requests/minute" in r.json()["detail"]
        assert c.post("/generate", json=REQUEST, headers=keys[1]).status_code == 200  # per key


def test_a_full_queue_gets_503_with_retry_after_and_ready_says_so(project):
    app = _app(project, ServeSettings(auth=False, rate_per_minute=0, poll_seconds=0, max_pending=1))
    with _client(app) as c:
        assert c.get("/ready").json() == {"ready": True, "version": 1,
                                          "queue": {"pending": 0, "max_pending": 1, "running": False}}
        gate, held = _hold_worker(app)
        try:
            waiting = threading.Thread(target=lambda: c.post("/generate", json=REQUEST))
            waiting.start()
            _wait_for(lambda: app.state.server.jobs.pending == 1, "the request to queue")
            r = c.post("/generate", json=REQUEST)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"]
            r = c.post("/generate/stream", json=REQUEST)
            assert r.status_code == 503 and "retry-after" in r.headers
            ready = c.get("/ready")
            assert ready.status_code == 503 and ready.json()["queue"]["pending"] == 1 and "retry-after" in ready.headers
            assert "stunning_queue_depth 1.0" in c.get("/metrics").text
        finally:
            gate.set()
        waiting.join(60)
        assert held.wait(60) and c.get("/ready").status_code == 200


def test_the_stream_sends_previews_then_the_image(project):
    with _client(_app(project)) as c:
        r = c.post("/generate/stream", json={**REQUEST, "steps": 3})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-model-version"] == "1"
        events = _events(r.text)
        kinds = [kind for kind, _ in events]
        assert kinds[0] == "queued" and kinds[-1] == "image" and "preview" in kinds
        previews = [data for kind, data in events if kind == "preview"]
        assert previews[-1]["total"] == 3 and all(1 <= p["step"] <= 3 for p in previews)
        assert Image.open(io.BytesIO(base64.b64decode(previews[-1]["image_base64"]))).format == "PNG"
        final = events[-1][1]
        assert final["version"] == 1 and final["seed"] == 5 and final["parameters"]["style"] == "noir"
        assert final["parameters"]["steps"] == 3 and final["count"] == 1
        plain = c.post("/generate", json={**REQUEST, "steps": 3})
        assert np.array_equal(_pixels(base64.b64decode(final["image_base64"])), _pixels(plain.content))

        r = c.post("/generate/stream", json={**REQUEST, "style": "cubism"})
        kind, data = _events(r.text)[-1]
        assert kind == "error" and data["status"] == 400 and "cubism" in data["detail"]


def test_a_new_request_on_a_channel_cancels_the_previous_one(project):
    app = _app(project)
    with _client(app) as c:
        gate, held = _hold_worker(app)
        try:
            first: dict = {}
            stream = threading.Thread(target=lambda: first.update(
                r=c.post("/generate/stream?channel=slider", json={**REQUEST, "seed": 1})))
            stream.start()
            _wait_for(lambda: app.state.server.jobs.pending == 1, "the first request to queue")
            second: dict = {}
            replacing = threading.Thread(target=lambda: second.update(
                r=c.post("/generate", json={**REQUEST, "seed": 2}, headers={"X-Channel": "slider"})))
            replacing.start()
            stream.join(30)  # cancelled at once, while the worker is still held
            assert not stream.is_alive()
            kind, data = _events(first["r"].text)[-1]
            assert kind == "cancelled" and "replaced by a newer request on channel" in data["reason"]
            assert app.state.server.jobs.pending == 1  # only the replacement waits
        finally:
            gate.set()
        replacing.join(60)
        assert second["r"].status_code == 200 and held.wait(60)


def test_the_server_follows_the_alias_without_failing_in_flight_requests(project):
    from stunning.registry import rollback

    cfg = RegistryConfig(model_name="api-switch")
    assert _register(project["root"], project["base"], cfg, project["first"]) == 1
    app = _app(project, model="api-switch")
    with _client(app) as c:
        v1 = c.post("/generate", json=REQUEST)
        assert v1.headers["x-model-version"] == "1" and app.state.poll() is False  # nothing moved

        gate, held = _hold_worker(app)
        try:
            in_flight: dict = {}
            request = threading.Thread(target=lambda: in_flight.update(
                r=c.post("/generate", json=REQUEST, headers={"Accept": "application/json"})))
            request.start()
            _wait_for(lambda: app.state.server.jobs.pending == 1, "the request to queue")
            assert _register(project["root"], project["base"], cfg, project["second"]) == 2  # promoted
            assert app.state.poll() is True  # loaded v2 and swapped, the worker still busy with v1 work
            assert c.get("/health").json()["version"] == 2
        finally:
            gate.set()
        request.join(60)
        r = in_flight["r"]
        assert r.status_code == 200 and r.headers["x-model-version"] == "1" and r.json()["version"] == 1
        assert np.array_equal(_pixels(base64.b64decode(r.json()["image_base64"])), _pixels(v1.content))
        assert held.wait(60)

        v2 = c.post("/generate", json=REQUEST)
        assert v2.headers["x-model-version"] == "2"
        assert np.abs(_pixels(v2.content) - _pixels(v1.content)).mean() > 1.0  # other adapter weights

        rollback(cfg, root=project["root"], reason="test")
        assert app.state.poll() is True
        back = c.post("/generate", json=REQUEST)
        assert back.headers["x-model-version"] == "1" and np.array_equal(_pixels(back.content), _pixels(v1.content))
        metrics = c.get("/metrics").text
        assert 'stunning_model_version{alias="champion",model_name="api-switch"} 1.0' in metrics
        assert "stunning_model_switches_total 2.0" in metrics


def test_metrics_count_requests_latency_and_images(project):
    with _client(_app(project)) as c:
        assert c.post("/generate", json=REQUEST).status_code == 200
        assert c.post("/generate", json={**REQUEST, "steps": 0}).status_code == 422
        c.get("/no-such-page")
        text = c.get("/metrics").text
    assert 'stunning_http_requests_total{endpoint="/generate",method="POST",status="200"} 1.0' in text
    assert 'stunning_http_requests_total{endpoint="/generate",method="POST",status="422"} 1.0' in text
    assert 'stunning_http_requests_total{endpoint="unmatched",method="GET",status="404"} 1.0' in text
    assert 'stunning_http_request_duration_seconds_count{endpoint="/generate"} 2.0' in text
    assert "stunning_images_generated_total 1.0" in text and "stunning_queue_depth 0.0" in text
    assert 'stunning_model_version{alias="champion",model_name="api-test"} 1.0' in text


def test_a_422_names_the_field_at_fault(project):
    with _client(_app(project)) as c:
        for body, field in (({"prompt": "x" * 3000}, "prompt"), ({**REQUEST, "steps": 500}, "steps"),
                            ({**REQUEST, "batch": 99}, "batch"), ({"prompt": "x", "styles": {"noir": 9.0}}, "styles")):
            r = c.post("/generate", json=body)
            assert r.status_code == 422 and r.json()["message"].startswith(f"invalid request: {field}"), r.json()
            assert r.json()["detail"][0]["loc"][:2] == ["body", field]


def test_no_auth_is_refused_off_loopback():
    no_auth = ServeSettings(auth=False)
    check_bind("127.0.0.1", no_auth)
    check_bind("::1", no_auth)
    check_bind("0.0.0.0", ServeSettings())  # with keys: allowed
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(UnsafeBindError, match="without authentication"):
            run_server(host, 1, settings=no_auth)  # refused before anything starts


def test_a_saved_default_negative_is_used_unless_the_request_gives_one(project):
    """`stunning negatives optimize` saves a style's best negative prompt; the server draws with
    it when a request names none, and an explicit negative prompt ("" = none) wins."""
    from stunning.studio.negatives import save_default_negative, store_path

    root = project["root"]
    with _client(_app(project)) as c:
        def draw(**extra) -> tuple[np.ndarray, dict]:
            r = c.post("/generate", json={**REQUEST, **extra}, headers={"Accept": "application/json"})
            assert r.status_code == 200, r.text
            return _pixels(base64.b64decode(r.json()["image_base64"])), r.json()

        plain, body = draw()
        assert body["negative_prompt"] is None
        save_default_negative(root, "style:noir", "a blue hat", {"improvement": {"style_gain": 0.1}})
        try:
            steered, body = draw()
            assert body["negative_prompt"] == "a blue hat"
            explicit, _ = draw(negative_prompt="a blue hat")
            assert np.array_equal(steered, explicit) and not np.array_equal(steered, plain)
            none, body = draw(negative_prompt="")
            assert body["negative_prompt"] == "" and np.array_equal(none, plain)
            other, body = draw(style=None)  # the base model: no style, no saved default
            assert body["negative_prompt"] is None
            # An empty style beside a request-time blend is no second target (the model draws the blend).
            _, body = draw(style="", styles={"noir": 1.0})
            assert body["negative_prompt"] is None
        finally:
            store_path(root).unlink()
