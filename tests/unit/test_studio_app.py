"""The studio web UI's handlers (`stunning.studio.app`), called as the page's events call them,
on a real tiny registered champion with two styles; and who may open the studio.

The browser itself is driven in tests/e2e/test_studio_browser.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stunning.cli import app
from tests.factories import register_tiny_champion

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_base, one_torch_thread):
    from stunning.studio.app import Studio

    root = tmp_path_factory.mktemp("studio")
    assert register_tiny_champion(root, tiny_base)["promoted"]
    s = Studio(root, device="cpu", poll_seconds=0, outputs_dir=root / "out")
    yield s
    s.close()


def _render(studio, weights: dict[str, float], *, negative: str = "", auto: bool = True, steps: int = 3,
            session: str = "s1", seed: int = 5):
    slots = studio.styles
    values = [weights.get(name, 0.0) for name in slots]
    return studio.on_render("a red dress", negative, auto, seed, steps, 4.0, "default", slots, [], *values,
                            session=session)


def _skipped(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


def test_a_slider_move_streams_a_preview_per_step_then_the_final_image(studio):
    from stunning.style_model import GenerateRequest

    assert studio.styles == ["impressionist", "noir"] and studio.version == 1
    yields = list(_render(studio, {"noir": 0.7, "impressionist": -0.3}))
    previews, final = yields[:-1], yields[-1]
    assert [y[1].split(" ·")[0] for y in previews] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all(isinstance(y[0], Image.Image) and all(_skipped(v) for v in y[3:]) for y in previews)
    path, status, negative, gallery, items = final
    assert status.startswith("done in") and "v1" in status and _skipped(negative)
    assert previews[0][2] == ""  # the negative box is filled once, with the first frame: no default saved
    assert gallery == [(path, items[0]["caption"])] and Path(path).parent == studio.outputs_dir
    record = items[0]["record"]
    assert record["styles"] == {"noir": 0.7, "impressionist": -0.3} and record["model_version"] == 1
    assert record["first_preview_s"] is not None and record["first_preview_s"] <= record["elapsed_s"]
    png = Image.open(path)
    assert png.text["parameters"].endswith("Styles: impressionist:-0.3 noir:0.7")  # slider order
    assert json.loads(png.text["stunning"])["seed"] == 5
    # The same pixels as the served model draws for that request.
    req = GenerateRequest(prompt="a red dress", seed=5, steps=3, guidance_scale=4.0, negative_prompt="",
                          styles={"impressionist": -0.3, "noir": 0.7})
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(studio.loaded.model.generate(req)))
    assert studio.on_select(items, 0) == record and studio.on_select(items, 3) == {}


def test_a_new_render_in_a_session_cancels_the_previous_one(studio):
    import threading

    first = _render(studio, {"noir": 1.0}, steps=60)
    assert next(first)[1].startswith("step 1/60")  # the first job is drawing
    second = list(_render(studio, {"noir": -1.0}, steps=2))  # the slider moved again in the same session
    assert isinstance(second[-1][4], list) and second[-1][4][0]["record"]["styles"] == {"noir": -1.0}
    rest = list(first)  # what the first had drawn before it stopped; never a final image
    assert len(rest) < 59 and not any(isinstance(y[4], list) for y in rest)

    # Another session's render waits its turn instead of cancelling this one.
    mine = _render(studio, {"noir": 1.0}, steps=30)
    assert next(mine)[1].startswith("step 1/30")
    theirs: list = []
    other = threading.Thread(target=lambda: theirs.extend(_render(studio, {"noir": 0.5}, steps=2, session="s2")))
    other.start()
    assert isinstance(list(mine)[-1][4], list)
    other.join(60)
    assert isinstance(theirs[-1][4], list)


def test_the_negative_prompt_is_prefilled_with_the_saved_default_until_typed(studio):
    from stunning.studio.negatives import save_default_negative

    root = studio.root
    try:
        save_default_negative(root, "style:noir", "blurry, washed out", {"test": True})
        save_default_negative(root, "blend:impressionist=0.5,noir=0.5", "low contrast", {"test": True})
        first, final = _render(studio, {"noir": 1.0}, steps=1)
        assert first[2] == "blurry, washed out" and final[4][0]["record"]["negative_prompt"] == "blurry, washed out"
        first, _ = _render(studio, {"noir": 0.5, "impressionist": 0.5}, steps=1)
        assert first[2] == "low contrast"
        first, final = _render(studio, {"noir": 0.5, "impressionist": 0.5}, negative="grainy", auto=False, steps=1)
        assert _skipped(first[2]) and final[4][0]["record"]["negative_prompt"] == "grainy"
        assert studio.on_negative_default(studio.styles, 0.0, 1.0) == ("blurry, washed out", True)
        assert studio.on_negative_default(studio.styles, 0.0, 0.3) == ("", True)  # nothing saved for it
    finally:
        (root / "studio" / "negatives.yaml").unlink(missing_ok=True)


def test_save_a_blend_and_load_it_back_into_the_sliders(studio):
    slots, n = studio.styles, 8
    dropdown, message = studio.on_save_blend("dusk", "grainy", slots, -0.3, 0.7)
    assert dropdown["choices"] == ["dusk"] and dropdown["value"] == "dusk" and "saved blend **dusk**" in message
    saved = (studio.blends_folder / "dusk.yaml").read_text()
    assert "impressionist: -0.3" in saved and "noir: 0.7" in saved and "grainy" in saved
    *sliders, negative, auto, status = studio.on_load_blend("dusk", slots, n)
    assert [s["value"] for s in sliders[:2]] == [-0.3, 0.7] and all(_skipped(s) for s in sliders[2:])
    assert (negative, auto) == ("grainy", False) and "loaded blend **dusk**" in status
    studio.on_save_blend("plain", "", slots, 0.0, 1.0)  # no negative: loading it makes the box automatic again
    assert studio.on_load_blend("plain", slots, n)[-3:-1] == ("", True)
    for name, values, message in [("bad name!", (0.5, 0.0), "is not valid"), ("zero", (0.0, 0.0), "every style slider")]:
        with pytest.raises(gr.Error, match=message):
            studio.on_save_blend(name, "", slots, *values)
    with pytest.raises(gr.Error, match="no saved blend 'nope'"):
        studio.on_load_blend("nope", slots, n)


def test_bad_requests_say_what_is_wrong(studio):
    slots = studio.styles
    cases = [(("", "", True, 0, 3, 4.0, "default"), "prompt"), (("a hat", "", True, 0, 3, 4.0, "ddim"), "unknown sampler")]
    for args, message in cases:
        with pytest.raises(gr.Error, match=message):
            list(studio.on_render(*args, slots, [], 0.0, 0.0))


def test_the_versions_table_and_a_champion_change_picked_up_on_refresh(tmp_path, tiny_base):
    from stunning.studio.app import Studio

    assert register_tiny_champion(tmp_path, tiny_base, "switch")["version"] == 1
    failed = {"passed": False, "checks": [], "reasons": ["style_gain/noir 0.01 < 0.05"],
              "candidate": {"metrics": {"style_gain": {"noir": 0.01}}}}
    assert not register_tiny_champion(tmp_path, tiny_base, "switch", seed=1, gate=failed)["promoted"]
    s = Studio(tmp_path, "models:/switch@champion", device="cpu", poll_seconds=0, outputs_dir=tmp_path / "out")
    try:
        headers, rows = s.versions_table()
        assert headers == ["", "v1 @champion (served)", "v2"]
        table = {r[0]: r[1:] for r in rows}
        assert table["gate"] == ["passed", "failed"] and table["style_gain/noir"] == ["0.25", "0.01"]
        assert table["reasons"] == ["", "style_gain/noir 0.01 < 0.05"]
        slots, n = s.styles, 8
        assert all(_skipped(u) for u in s.on_sync(slots, n, 1))  # the timer tick: nothing changed

        assert register_tiny_champion(tmp_path, tiny_base, "switch", seed=2)["version"] == 3
        out = s.on_refresh(slots, n, 1)  # the Refresh button polls the alias and loads v3
        text, versions, _sampler, _saved, new_slots, version = out[:6]
        assert version == 3 and s.version == 3 and "switch v3" in text and new_slots == slots
        assert versions["value"]["headers"][1:3] == ["v3 @champion (served)", "v1 @previous-champion"]
        assert s.poll() is False  # nothing moved since
    finally:
        s.close()


def test_who_may_open_the_studio(tmp_path):
    from stunning.serve import UnsafeBindError
    from stunning.studio.app import StudioError, check_studio_bind, key_auth
    from stunning.studio.keys import KeyStore

    path = tmp_path / "keys.json"
    assert check_studio_bind("127.0.0.1", None, 0, path) is False  # loopback: no sign-in by default
    assert check_studio_bind("localhost", False, 0, path) is False
    assert check_studio_bind("0.0.0.0", None, 1, path) is True  # elsewhere: keys required
    with pytest.raises(UnsafeBindError, match="loopback only"):
        check_studio_bind("0.0.0.0", False, 1, path)
    with pytest.raises(StudioError, match="stunning keys create"):
        check_studio_bind("192.168.1.5", None, 0, path)
    with pytest.raises(StudioError, match="has none"):
        check_studio_bind("127.0.0.1", True, 0, path)

    keys = KeyStore(path)
    record, key = keys.create("alice")
    check = key_auth(keys)
    assert check("key", key) and check("anyone", key) and not check("key", "stn_wrong") and not check("key", "")
    keys.revoke(record.id)
    assert not check("key", key)

    runner = CliRunner()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    base = ["studio", "--params", str(tmp_path / "params.yaml")]
    refused = runner.invoke(app, [*base, "--host", "0.0.0.0", "--no-auth"])
    assert refused.exit_code == 2 and "loopback only" in refused.output
    no_keys = runner.invoke(app, [*base, "--host", "0.0.0.0"])
    assert no_keys.exit_code == 2 and "has none" in no_keys.output
