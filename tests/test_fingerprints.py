"""Fingerprints of a result's input files, and what info says when one changed."""

from __future__ import annotations

import json
import os

from attndistill.fingerprints import KEY, changed_inputs, fingerprints, relocated


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
    weights = vae / "sub" / "weights.safetensors"
    then = weights.stat().st_mtime_ns
    weights.write_bytes(b"w" * 2_999_999 + b"x")  # same size, other weights
    os.utime(weights, ns=(then + 10**9, then + 10**9))  # saved a second later, as a tuning run saves it
    b.unlink()
    assert changed_inputs(recorded) == [f"style '{b}' is gone", f"vae '{vae}' has changed"]
    (vae / "sub" / "weights.safetensors").rename(vae / "sub" / "other.safetensors")  # a renamed file counts too
    assert f"vae '{vae}' has changed" in changed_inputs(recorded)


def test_a_file_is_read_once_while_its_size_and_time_stay(tmp_path, monkeypatch):
    """A batch of results sharing a VAE folder reads its hundreds of MB once, not once per result."""
    import attndistill.fingerprints as fp

    file = tmp_path / "weights.bin"
    file.write_bytes(b"a" * 1000)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    first = fp.file_digest(file)
    assert fp.file_digest(file) == first and opened == [file]
    os.utime(file, ns=(file.stat().st_mtime_ns + 10**9,) * 2)  # saved again
    assert fp.file_digest(file) == first and opened == [file, file]


def test_inputs_gone_from_their_paths_are_found_beside_the_result_by_name_and_digest(tmp_path):
    """A results folder moved or shared with its inputs (the web UI keeps copies in inputs/) reruns from its
    records: a file of the same name and digest beside the result, or in its inputs/ folder, stands in."""
    old, new = tmp_path / "old", tmp_path / "new"
    (new / "inputs").mkdir(parents=True)
    for name, folder in (("c.png", new), ("s.png", new / "inputs"), ("other.png", new)):
        (folder / name).write_bytes(name.encode())
    recorded = {"content": str(old / "c.png"), "style": [str(old / "s.png"), str(old / "other.png")],
                "mask": str(old / "m.png"), "seed": 1}
    recorded[KEY] = {"content": fingerprints({"content": str(new / "c.png")})["content"],
                     "style": [fingerprints({"s": str(new / "inputs" / "s.png")})["s"], "0" * 16],
                     "mask": "1" * 16}
    found, said = relocated(recorded, new)
    assert found["content"] == str(new / "c.png") and found["style"] == [str(new / "inputs" / "s.png"),
                                                                          str(old / "other.png")]
    assert found["mask"] == str(old / "m.png") and found["seed"] == 1  # no file of its digest: left, and said gone
    assert said == [f"content '{old / 'c.png'}' is gone; the same file is at '{new / 'c.png'}'",
                    f"style '{old / 's.png'}' is gone; the same file is at '{new / 'inputs' / 's.png'}'"]
    assert changed_inputs(found) == [f"style '{old / 'other.png'}' is gone", f"mask '{old / 'm.png'}' is gone"]
    assert relocated({"content": "a.png"}, new) == ({"content": "a.png"}, [])  # no digests: nothing to match


def test_inputs_of_a_project_moved_whole_are_found_where_it_put_them(tmp_path):
    """Inputs in proj/img/ and results in proj/out/: the moved project's inputs are beside no result, and were
    said to be gone."""
    old, new = tmp_path / "proj", tmp_path / "elsewhere" / "proj2"
    (new / "img" / "styles").mkdir(parents=True)
    (new / "out" / "run1").mkdir(parents=True)
    (new / "img" / "c.png").write_bytes(b"content")
    (new / "img" / "styles" / "s.png").write_bytes(b"style")
    (new / "img" / "other.png").write_bytes(b"not the style")
    recorded = {"content": str(old / "img" / "c.png"), "style": [str(old / "img" / "styles" / "s.png")],
                "mask": str(old / "img" / "other.png")}
    recorded[KEY] = {"content": fingerprints({"c": str(new / "img" / "c.png")})["c"],
                     "style": [fingerprints({"s": str(new / "img" / "styles" / "s.png")})["s"]],
                     "mask": fingerprints({"c": str(new / "img" / "c.png")})["c"]}  # another file's digest
    found, said = relocated(recorded, new / "out" / "run1")
    assert found["content"] == str(new / "img" / "c.png")
    assert found["style"] == [str(new / "img" / "styles" / "s.png")]
    assert found["mask"] == str(old / "img" / "other.png") and len(said) == 2


def test_a_result_records_its_inputs_as_the_run_read_them(tmp_path, data_dir, tiny_sd15):
    """Digests were taken when the run ended: a style image edited while it ran was recorded as the one used, so
    info warned of nothing and a rerun read another image."""
    import shutil

    from PIL import Image

    import attndistill as ad
    from attndistill.fingerprints import file_digest

    style = shutil.copy(data_dir / "wood-rings.jpg", tmp_path / "style.jpg")
    used = file_digest(style)

    def edit_the_style(info) -> None:
        if info.step == 0:
            Image.open(data_dir / "watercolor-cat.jpg").save(style)

    image = ad.style_transfer(data_dir / "horse.jpg", style, model=tiny_sd15, steps=2, size=64,
                              callback=edit_the_style)
    params = json.loads(image.info["parameters"])
    assert params[KEY]["style"] == [used] != [file_digest(style)]
    assert changed_inputs(params) == [f"style '{style}' has changed"]


def test_a_vae_folder_is_recorded_as_it_was_loaded(tmp_path, data_dir, tiny_sd15_dir):
    """One loaded model serves many runs (the web UI, a batch): a VAE folder saved again meanwhile was recorded
    as the one the run decoded with."""
    import shutil

    import attndistill as ad
    from attndistill.fingerprints import folder_digest

    vae = shutil.copytree(tiny_sd15_dir / "vae", tmp_path / "my-vae")
    loaded = folder_digest(vae)
    model = ad.load_model(str(tiny_sd15_dir), vae=str(vae), device="cpu", dtype="fp32")
    config = vae / "config.json"
    config.write_text(config.read_text() + "\n")  # saved again under its name
    image = ad.texture_synthesis(data_dir / "wood-rings.jpg", model=model, steps=1, size=64)[0]
    params = json.loads(image.info["parameters"])
    assert params[KEY]["vae"] == loaded != folder_digest(vae)
    assert changed_inputs(params) == [f"vae '{vae}' has changed"]
