"""The benchmark script still runs (tiny model, CPU): it measures, so it must not rot between GPU sessions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_bench_prints_one_json_line_per_run(capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--device", "cpu", "--cases", "a,c", "--steps", "1", "--compare", "--size-scale", "0.25",
                "--profile", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["case"], r["path"]) for r in rows] == [
        ("a", "fast"), ("a", "profile"), ("a", "plain"), ("a", "fast-vs-plain"),
        ("c", "fast"), ("c", "profile"), ("c", "plain"), ("c", "fast-vs-plain")]
    assert all(r["top"] and r["top"][0]["ms"] > 0 for r in rows if r["path"] == "profile")
    assert all("error" not in r for r in rows)
    assert all(r["seconds"] > 0 and r["card"] == "cpu" for r in rows if r["path"] in ("fast", "plain"))
    assert all(r["max_abs_pixel_diff"] <= 1 / 255 for r in rows if r["path"] == "fast-vs-plain")


def test_breakdown_times_static_calls_by_kind():
    import torch

    path = Path(__file__).parent.parent / "benchmarks" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from attndistill.stepper import StaticCall

    iteration = StaticCall(lambda: torch.ones(2).sum(), capture=False, grad=True)
    denoise = StaticCall(lambda: torch.zeros(2), capture=False, grad=False)
    with bench.timed_static_calls(torch.device("cpu")) as parts:
        iteration(), iteration(), denoise()
    assert {k: v["calls"] for k, v in parts.items()} == {"iteration": 2, "denoising": 1}
    assert all(v["ms"] >= 0 for v in parts.values())
    assert iteration() == 2 and parts["iteration"]["calls"] == 2  # the original call is back, untimed
