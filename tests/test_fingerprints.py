"""Fingerprints of a result's input files, and what info says when one changed."""

from __future__ import annotations

from attndistill.fingerprints import KEY, changed_inputs, fingerprints


def test_files_and_folders_are_fingerprinted_and_their_changes_named(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    vae = tmp_path / "vae"
    (vae / "sub").mkdir(parents=True)
    (vae / "config.json").write_text("{}")
    (vae / "sub" / "weights.safetensors").write_bytes(b"w" * 3_000_000)  # more than one read
    params = {"style": [str(a), str(b), "<image>"], "content": str(a), "vae": str(vae), "model": str(vae),
              "prompt": "a barn", "seed": 3, "size": [64, 64], "relative": "a.png", "hub": "owner/name"}
    found = fingerprints(params)
    assert set(found) == {"style", "content", "vae"}  # not the model's weights, nor what is no local path
    assert found["style"][0] == found["content"] != found["style"][1] and found["style"][2] is None
    recorded = {**params, KEY: found}
    assert changed_inputs(recorded) == [] and changed_inputs(params) == []
    (vae / "sub" / "weights.safetensors").write_bytes(b"w" * 2_999_999 + b"x")  # same size, other weights
    b.unlink()
    assert changed_inputs(recorded) == [f"style '{b}' is gone", f"vae '{vae}' has changed"]
    (vae / "sub" / "weights.safetensors").rename(vae / "sub" / "other.safetensors")  # a renamed file counts too
    assert f"vae '{vae}' has changed" in changed_inputs(recorded)
