"""Property-based fuzzing of `POST /generate` (Hypothesis): whatever the body, never a 500.

Random JSON values and objects (NaN/±Infinity literals, huge strings and numbers, wrong
types, unknown keys) and raw bytes must get a documented status (200, 400, 413, 422) with a
small, valid JSON error body; valid requests must get 200 (or 400 for an unknown adapter).
Request validation happens before generation, so the model is stubbed at the load boundary
only: a real :class:`StyleModel` (adapter choice, locking) around a family whose sampler
returns a blank image instead of running the denoiser.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stunning.config import RegistryConfig

LIMIT = 64 * 1024
SMALL = 4096  # every error body stays below this
DOCUMENTED = {200, 400, 413, 422}
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Pipe:
    def disable_lora(self): ...
    def enable_lora(self): ...
    def set_adapters(self, names, adapter_weights=None): ...


class _Family:
    name = "sd3"

    def resolution(self, pipe) -> int:
        return 8

    def generate(self, pipe, prompts, seeds, steps, guidance_scale, *, negative_prompts=None, on_step=None):
        assert math.isfinite(guidance_scale) and 1 <= steps <= 200  # what validation guarantees
        return [Image.new("RGB", (8, 8)) for _ in prompts]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    import stunning.registry as registry
    import stunning.serve as serve
    from stunning.style_model import StyleModel

    def fake_load(artifacts, device=None):
        return StyleModel(_Pipe(), _Family(), {"noir": "style_noir"}, {"mix": "blend_mix"}, {"family": "sd3"}, "cpu")

    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "resolve", lambda *a, **k: (7, root))
        mp.setattr(registry, "model_artifacts", lambda model_dir: {})
        mp.setattr(serve.StyleModel, "load", staticmethod(fake_load))
        # Validation is under test here, not keys or rate limits: both off.
        settings = serve.ServeSettings(auth=False, rate_per_minute=0, poll_seconds=0)
        with TestClient(serve.create_app(None, RegistryConfig(model_name="fuzz"), root=root, settings=settings)) as c:
            assert c.get("/health").json()["status"] == "ok"
            yield c


def _check(r, body_len: int) -> None:
    assert r.status_code in DOCUMENTED, (r.status_code, r.text[:300])
    if body_len > LIMIT:
        assert r.status_code == 413
    if r.status_code == 200:
        assert r.headers["content-type"] in ("image/png",) or r.headers["content-type"].startswith("application/json")
        return
    assert len(r.content) < SMALL, (r.status_code, len(r.content))
    body = json.loads(r.content)  # valid, strict JSON (no NaN/Infinity literals)
    assert "detail" in body
    json.dumps(body, allow_nan=False)


_numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 2**63, 2**64]),
)
_strings = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=0, max_value=120_000).map(lambda n: "x" * n),  # up to twice the body limit
    st.sampled_from(["noir", "mix", "cubism", ""]),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, _strings)
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
_fields = ("prompt", "style", "blend", "seed", "steps", "guidance_scale")
_objects = st.dictionaries(st.one_of(st.sampled_from(_fields), st.text(max_size=12)), _json, max_size=8)


def _post(client, raw: bytes, accept: str):
    return client.post("/generate", content=raw, headers={"Content-Type": "application/json", "Accept": accept})


_accepts = st.sampled_from(["image/png", "application/json", "*/*", "text/html"])


@FUZZ
@given(body=st.one_of(_objects, _json), accept=_accepts)
def test_any_json_body_gets_a_documented_small_answer(client, body, accept):
    raw = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity as literals, as Python's json accepts
    _check(_post(client, raw, accept), len(raw))


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_raw_bytes_never_break_the_server(client, raw):
    _check(_post(client, raw, "image/png"), len(raw))


_valid = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=50).filter(str.strip)},
    optional={
        "style": st.sampled_from(["noir", None]),
        "seed": st.integers(min_value=0, max_value=2**63 - 1),
        "steps": st.integers(min_value=1, max_value=200),
        "guidance_scale": st.floats(min_value=0.0, max_value=50.0, allow_nan=False),
    },
)


@FUZZ
@given(body=_valid, accept=_accepts, blend=st.sampled_from([None, "mix", "nope"]))
def test_valid_requests_generate(client, body, accept, blend):
    if blend is not None:
        body = {**body, "blend": blend}
    raw = json.dumps(body, allow_nan=False).encode()
    r = _post(client, raw, accept)
    if blend == "nope" or (blend and body.get("style")):
        assert r.status_code == 400 and len(r.content) < SMALL
    else:
        assert r.status_code == 200, r.text[:300]
        assert r.headers["x-model-version"] == "7"
