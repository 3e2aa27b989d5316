"""Batch runner: kill-and-resume, sharding (torchrun, --shard, Slurm env), locks, results, NaN guard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attndistill.batch.runner import JobLock, ModelSpec, append_record, read_jobs, read_records, resolve_shard, select
from attndistill.batch.state import STALE_AFTER_S
from attndistill.cli import app
from attndistill.errors import UserError
from attndistill.images import read_parameters

CLI = str(Path(sys.executable).parent / "attndistill")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models on a shared CPU: one thread is fastest
PAIRS = [("style", "horse.jpg", "watercolor-cat.jpg"), ("style", "golden-gate.jpg", "watercolor-cat.jpg"),
         ("style", "horse.jpg", "wood-rings.jpg"), ("appearance", "horse.jpg", "wood-rings.jpg"),
         ("appearance", "golden-gate.jpg", "watercolor-cat.jpg"), ("texture", "wood-rings.jpg", None),
         ("texture", "watercolor-cat.jpg", None), ("style", "golden-gate.jpg", "wood-rings.jpg")]


def job_line(task: str, a: str, b: str | None, **options) -> dict:
    inputs = {"style": ("content", "style"), "appearance": ("structure", "appearance"), "texture": ("reference",)}
    job = {"task": task, **dict(zip(inputs[task], [a, b])), "size": 64, "steps": 1}
    return {**job, **options}


def write_jobs(folder: Path, data_dir: Path, jobs: list[dict]) -> Path:
    """A jobs file beside copies of the test images (paths in it are relative to it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("horse.jpg", "golden-gate.jpg", "watercolor-cat.jpg", "wood-rings.jpg"):
        shutil.copy(data_dir / name, folder / name)
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def eight_jobs(tmp_path, data_dir) -> Path:
    return write_jobs(tmp_path / "in", data_dir, [job_line(*p, seed=i) for i, p in enumerate(PAIRS)])


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def done_records(out: Path) -> Counter:
    return Counter(r["job"] for r in read_records(out) if r["status"] == "done")


def complete_outputs(out: Path) -> dict[str, int]:
    """job id -> number of complete images carrying it; any unreadable PNG fails the test."""
    found: Counter = Counter()
    for png in out.rglob("*.png"):
        with Image.open(png) as img:
            img.load()  # a truncated file raises here
        found[read_parameters(png)["job"]] += 1
    return dict(found)


def test_every_task_of_a_jobs_file_names_a_function_that_takes_its_inputs():
    """Tasks are imported by module name only when a job uses them: a renamed module or function is caught
    here, not by the first user whose jobs file names that task."""
    import inspect

    from attndistill.batch.jobs import TASKS

    for name, spec in TASKS.items():
        parameters = inspect.signature(spec.resolve()).parameters
        assert set(spec.inputs) | set(spec.paths) <= set(parameters), name


def test_kill_and_resume_loses_and_repeats_nothing(eight_jobs, tmp_path, tiny_sd15_dir):
    out = tmp_path / "out"
    cmd = [CLI, "batch", str(eight_jobs), "--out", str(out), "-m", str(tiny_sd15_dir), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not done_records(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()

    # no partial image: every .png is complete and belongs to a job; temp files are hidden .partial names
    first = complete_outputs(out)
    assert 1 <= len(first) < len(PAIRS), "the kill must land in the middle of the batch"
    assert all(n == 1 for n in first.values())
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}

    result = invoke("batch", eight_jobs, "--out", out, "-m", tiny_sd15_dir, "-q")
    assert result.exit_code == 0, result.output
    final = complete_outputs(out)
    lost = len(PAIRS) - len(final)
    repeated = sum(n - 1 for n in done_records(out).values())
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished jobs were not redone
    assert lost == 0 and repeated == 0
    assert set(done_records(out)) == set(final)
    assert not list(out.rglob("*.partial")) and not list((out / ".locks").glob("*"))
    print(f"kill-and-resume: {len(first)} finished before SIGKILL; jobs lost: {lost}, jobs repeated: {repeated}")

    again = invoke("batch", eight_jobs, "--out", out, "-m", tiny_sd15_dir)
    assert again.exit_code == 0 and f"{len(PAIRS)} already done" in again.output
    assert sum(done_records(out).values()) == len(PAIRS)


def test_sigterm_releases_the_lock_and_leaves_no_partial_output(tmp_path, data_dir, tiny_sd15_dir):
    """SIGTERM (sent to this process once the long job holds its lock) stops the batch cleanly with 143."""
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("texture", "wood-rings.jpg", None, output="quick.png"),
        job_line("texture", "wood-rings.jpg", None, steps=1000, iters=1000, output="long.png")])
    out = tmp_path / "out"

    def terminate_when_running() -> None:
        deadline, since = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            if done_records(out) and list((out / ".locks").glob("*.lock")):
                # held for a while: the long job's lock, not the quick job's on its way out (a slow machine
                # once saw that one, and the signal landed between the jobs)
                since = since or time.monotonic()
                if time.monotonic() - since > 0.5:
                    os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler turns it into an exception
                    return
            else:
                since = None
            time.sleep(0.02)

    watcher = threading.Thread(target=terminate_when_running, daemon=True)
    watcher.start()
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    watcher.join(timeout=10)
    assert result.exit_code == 143, result.output
    assert "interrupted; no partial output left" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["batch.json", "quick.png", "results.jsonl"]
    assert not list((out / ".locks").iterdir()) and not list(out.glob(".*.partial"))


def test_an_interrupt_between_a_jobs_images_leaves_none_of_them(tmp_path, data_dir, tiny_sd15_dir, monkeypatch):
    """SIGTERM after the first of a job's three images left it, beside a log line saying no partial output was
    left (the next run removed it)."""
    import attndistill.batch.runner as runner
    from attndistill.cli.common import Terminated

    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("texture", "wood-rings.jpg", None, num=3, steps=1)])
    out, real, saved = tmp_path / "out", runner._save_result, []

    def interrupted_at_second(image, path, job, **kwargs):
        if saved:
            raise Terminated()
        saved.append(real(image, path, job, **kwargs)[0])
        return saved[-1], None

    monkeypatch.setattr(runner, "_save_result", interrupted_at_second)
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert result.exit_code == 143 and "interrupted; no partial output left" in result.output, result.output
    assert len(saved) == 1 and not list(out.glob("*.png"))
    monkeypatch.setattr(runner, "_save_result", real)
    assert invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir).exit_code == 0
    assert len(list(out.glob("texture-*.png"))) == 3


def test_a_console_reader_that_leaves_fails_no_job(tmp_path, data_dir, tiny_sd15_dir):
    """``attndistill batch ... 2>&1 | head``: the first progress line written after the reader left raised
    BrokenPipeError, which failed that job for good (--retry-failed to run it again) and stopped the batch."""
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("texture", "wood-rings.jpg", None),
                                                  job_line("style", "horse.jpg", "wood-rings.jpg")])
    out = tmp_path / "out"
    proc = subprocess.Popen([CLI, "batch", str(jobs), "--out", str(out), "-m", str(tiny_sd15_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    proc.stdout.close()  # the reader is gone before the first line
    assert proc.wait(timeout=300) == 0
    assert sorted(done_records(out).values()) == [1, 1] and len(list(out.glob("*.png"))) == 2


def test_finished_but_unrecorded_jobs_are_recovered_not_rerun(tmp_path, data_dir, tiny_sd15_dir):
    """A kill between writing the images and recording the job: the images carry the job id."""
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("texture", "wood-rings.jpg", None, num=2),
                                                  job_line("style", "horse.jpg", "wood-rings.jpg")])
    out = tmp_path / "out"
    assert invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir).exit_code == 0
    (out / "results.jsonl").unlink()  # killed before the records were written
    texture = sorted(out.glob("texture-*.png"))
    texture[1].unlink()  # and, for the two-image job, before its second image
    kept = {p: p.stat().st_mtime_ns for p in out.glob("style-*.png")}
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert result.exit_code == 0 and result.output.count("2 jobs: 1 done, 1 already done") == 1  # printed once
    records = {r["task"]: r for r in read_records(out)}
    assert records["style"].get("recovered") is True and records["texture"]["status"] == "done"
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert len(complete_outputs(out)) == 2 and sum(complete_outputs(out).values()) == 3


def test_torchrun_two_processes_run_each_job_once(eight_jobs, tmp_path, tiny_sd15_dir):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           CLI, "batch", str(eight_jobs), "--out", str(out), "-m", str(tiny_sd15_dir), "-q"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]

    records = read_records(out)
    by_shard = {s: {r["job"] for r in records if r["shard"] == s} for s in ("0/2", "1/2")}
    assert by_shard["0/2"] and by_shard["1/2"] and not by_shard["0/2"] & by_shard["1/2"]
    assert len({r["pid"] for r in records}) == 2
    assert sorted(done_records(out).values()) == [1] * len(PAIRS)
    assert len(complete_outputs(out)) == len(PAIRS)
    # rank 0 merged the shard files after a barrier; --merge again gives the same complete file
    merged = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(merged) == len(PAIRS) and {r["status"] for r in merged} == {"done"}
    result = invoke("batch", "--merge", out)
    assert result.exit_code == 0 and f"{len(PAIRS)} done, 0 failed, 0 without a result" in result.output


def test_shards_of_three_cover_every_job_once(eight_jobs, tmp_path, tiny_sd15_dir):
    out = tmp_path / "out"
    for i in range(3):
        result = invoke("batch", eight_jobs, "--out", out, "-m", tiny_sd15_dir, "--shard", f"{i}/3", *["-q"] * i)
        assert result.exit_code == 0, result.output
        assert result.output.count(" jobs: ") == 1 and f"shard {i}/3: " in result.output  # the summary, once
        assert ("loss=" in result.output) is (i == 0)  # each job's progress bar, as the commands show it; -q: none
        assert (out / f"results.shard-{i}-of-3.jsonl").is_file()
    assert not (out / "results.jsonl").exists()  # no barrier between separate commands: merge is explicit
    assert sorted(done_records(out).values()) == [1] * len(PAIRS)
    assert len(complete_outputs(out)) == len(PAIRS)

    result = invoke("batch", "--merge", out)
    assert result.exit_code == 0, result.output
    merged = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    jobs = read_jobs(eight_jobs, out_dir=out, defaults=ModelSpec(source=str(tiny_sd15_dir)))
    assert sorted(r["job"] for r in merged) == sorted(j.id for j in jobs)
    assert [r["line"] for r in merged] == sorted(r["line"] for r in merged)
    assert invoke("batch", "--merge", out).output == result.output  # idempotent
    other = invoke("batch", tmp_path / "jobs.jsonl", "--merge", out)  # the jobs would not run: said, not ignored
    assert other.exit_code == 2 and "--merge DIR only merges the shards' results of DIR and runs no job; drop " \
        "the jobs file, or run the jobs without --merge" in other.output


def test_a_jobs_id_is_of_the_files_its_paths_lead_to_and_of_the_commands_dtype(tmp_path):
    """The same line beside other images is another job: its id hashed the paths as written, so a second jobs
    file's 'c.jpg' was counted done with the first file's image. A --dtype of the command made no other id
    either, where a job's own "dtype" did."""
    line = json.dumps({"task": "style", "content": "c.jpg", "style": "s.jpg", "steps": 1, "size": 64})
    ids = {}
    for folder in ("A", "B"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "jobs.jsonl").write_text(line + "\n")
        ids[folder] = read_jobs(tmp_path / folder / "jobs.jsonl", out_dir=tmp_path / "out")[0].id
    assert ids["A"] != ids["B"]
    by_dtype = {dtype: read_jobs(tmp_path / "A" / "jobs.jsonl", out_dir=tmp_path / "out",
                                 defaults=ModelSpec(dtype=dtype))[0].id for dtype in ("auto", "fp32", "bf16")}
    assert by_dtype["auto"] == ids["A"] and len(set(by_dtype.values())) == 3


def test_a_jobs_model_is_looked_for_beside_the_jobs_file_only(tmp_path, monkeypatch):
    """A job's "model": "tiny" that is not beside the jobs file was looked for in the current folder: the same
    line ran or failed depending on where the command started. Hub ids stay Hub ids."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "tiny").mkdir()  # beside the current folder, not beside the jobs file
    jobs = tmp_path / "sub" / "jobs.jsonl"
    line = {"task": "style", "content": "c.jpg", "style": "s.jpg"}
    jobs.write_text(json.dumps(line | {"model": "tiny"}) + "\n" + json.dumps(line | {"model": "owner/name"}) + "\n")
    monkeypatch.chdir(tmp_path)
    local, hub = read_jobs(jobs, out_dir=tmp_path / "out")
    assert local.model.source == str(tmp_path / "sub" / "tiny") and hub.model.source == "owner/name"


def test_a_line_separator_inside_a_string_is_no_line_break(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    first = json.dumps({"task": "t2i", "prompt": "a\u2028b\u0085c", "style": "s.jpg"}, ensure_ascii=False)
    jobs.write_text(first + "\r\n" + json.dumps({"task": "style", "style": "s.jpg"}) + "\r\n", encoding="utf-8")
    parsed = read_jobs(jobs, out_dir=tmp_path / "out")
    assert [j.line for j in parsed] == [1, 2] and not parsed[0].error
    assert parsed[0].args["prompt"] == "a\u2028b\u0085c" and parsed[1].error.startswith("line 2:")


def test_shard_selection_is_a_partition(eight_jobs, tmp_path):
    jobs = read_jobs(eight_jobs, out_dir=tmp_path)
    for n in (1, 2, 3, 5, 8, 11):
        parts = [select(jobs, resolve_shard(f"{i}/{n}", env={})) for i in range(n)]
        ids = [j.id for part in parts for j in part]
        assert sorted(ids) == sorted(j.id for j in jobs)  # every job exactly once
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    shuffled = list(reversed(jobs))  # the split does not depend on the order jobs are read in
    assert [j.id for j in select(shuffled, resolve_shard("1/3", env={}))] == \
        [j.id for j in select(jobs, resolve_shard("1/3", env={}))]
    # jobs sharing model, size and reference are contiguous, so a shard loads and encodes less
    refs = [j.args.get(j.spec.reference) for j in select(jobs, resolve_shard("0/1", env={}))]
    assert all(refs.index(r) == i or refs[i - 1] == r for i, r in enumerate(refs))


def test_shard_from_launcher_environment():
    assert resolve_shard(None, env={}) == resolve_shard("0/1", env={})
    torchrun = resolve_shard(None, env={"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (torchrun.index, torchrun.count, torchrun.local_rank) == (3, 4, 1)
    slurm = resolve_shard(None, env={"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5",
                                     "SLURM_ARRAY_TASK_COUNT": "4"})
    assert (slurm.index, slurm.count) == (2, 4)
    both = resolve_shard(None, env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1",
                                    "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (both.index, both.count) == (3, 6)  # array task 1 of 3, rank 1 of 2
    assert resolve_shard("2/5", env={"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"}).index == 2
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(UserError, match="shard"):
            resolve_shard(bad, env={})
    with pytest.raises(UserError, match="outside the array"):  # a task id beyond the array would run nothing
        resolve_shard(None, env={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3"})


def test_nan_guard_fails_the_job_not_the_batch(tmp_path, data_dir, tiny_sd15_dir):
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("style", "horse.jpg", "wood-rings.jpg", lr=1e30, steps=2, output="nan.png"),
        job_line("texture", "wood-rings.jpg", None, output="ok.png")])
    out = tmp_path / "out"
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert result.exit_code == 1
    records = {r["job"].split("-")[0]: r for r in read_records(out)}
    assert records["style"]["status"] == "failed" and "NaN/Inf" in records["style"]["error"]
    assert records["style"]["outputs"] == []  # nothing written: a record names only files that exist
    assert records["texture"]["status"] == "done" and records["texture"]["outputs"] == ["ok.png"]
    assert not (out / "nan.png").exists() and (out / "ok.png").is_file()


def disk_full_at_the_second_save(monkeypatch) -> None:
    """The disk fills up at the second image saved, and only then."""
    from attndistill import images

    original, calls = images.save_png, []

    def save_png(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(images, "save_png", save_png)


def test_a_job_failing_between_its_images_records_what_it_wrote(tmp_path, data_dir, tiny_sd15_dir, monkeypatch):
    disk_full_at_the_second_save(monkeypatch)
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("texture", "wood-rings.jpg", None, num=2, output="t.png")])
    out = tmp_path / "out"
    assert invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir).exit_code == 1
    [record] = read_records(out)
    assert record["status"] == "failed" and record["outputs"] == ["t-0.png"] and (out / "t-0.png").is_file()


def test_nan_guard_on_the_decoded_image(tiny_sd15, data_dir, tmp_path):
    """One absurd step leaves a finite but huge latent: decoding it must not give a black image."""
    from attndistill import style_transfer
    from attndistill.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        style_transfer(data_dir / "horse.jpg", data_dir / "wood-rings.jpg", model=tiny_sd15, steps=1, lr=1e30,
                       size=64, progress=False)


def failing_once(monkeypatch, module: str = "transfer", name: str = "style_transfer") -> None:
    """The task fails (as a job that runs out of memory would) until the test puts it back."""
    import functools
    import importlib

    tasks = importlib.import_module(f"attndistill.tasks.{module}")

    @functools.wraps(getattr(tasks, name))
    def fails(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(tasks, name, fails)


def test_a_folder_given_as_an_image_is_not_read_for_the_job_id(tmp_path, data_dir, tiny_sd15_dir, monkeypatch):
    """Ids hash their images' contents: a folder given as one ('reference': '/usr/lib') was read whole (25 s) before
    the checks refused it as a directory."""
    import attndistill.fingerprints as fingerprints

    def never(path):
        raise AssertionError(f"read the folder {path}")

    monkeypatch.setattr(fingerprints, "folder_digest", never)
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("texture", str(data_dir), None)])
    result = invoke("batch", jobs, "--out", tmp_path / "out", "-m", tiny_sd15_dir, "--dry-run")
    assert result.exit_code == 2 and "is a directory" in result.output, result.output


def test_failed_jobs_rerun_only_with_retry_failed(tmp_path, data_dir, tiny_sd15_dir, monkeypatch):
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("style", "horse.jpg", "wood-rings.jpg")])
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        failing_once(patch)
        first = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert first.exit_code == 1 and "the device went away" in first.output
    second = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert second.exit_code == 1 and "rerun with --retry-failed" in second.output
    assert not list(out.glob("*.png"))
    third = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--retry-failed")
    assert third.exit_code == 0, third.output
    assert [r["status"] for r in read_records(out)] == ["failed", "done"]


def test_a_job_whose_input_changed_is_another_job(tmp_path, data_dir, tiny_sd15_dir):
    """An input replaced in place (a missing one supplied, a content image edited) was the same job: one that had
    failed needed --retry-failed, and one that was done was skipped, its result made from the old image."""
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("style", "horse.jpg", "later.jpg")])
    out = tmp_path / "out"
    first = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert first.exit_code == 1 and "later.jpg' does not exist" in first.output
    shutil.copy(data_dir / "wood-rings.jpg", tmp_path / "in" / "later.jpg")
    second = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert second.exit_code == 0 and "1 jobs: 1 done" in second.output, second.output
    shutil.copy(data_dir / "watercolor-cat.jpg", tmp_path / "in" / "later.jpg")  # edited after its result
    third = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert third.exit_code == 0 and "1 jobs: 1 done" in third.output, third.output
    made = sorted(out.glob("*.png"))
    assert len(made) == 2 and len({str(read_parameters(p)["input_sha256"]["style"]) for p in made}) == 2
    moved = tmp_path / "moved"  # the project folder moved elsewhere: its jobs are done
    shutil.move(tmp_path / "in", moved)
    again = invoke("batch", moved / jobs.name, "--out", out, "-m", tiny_sd15_dir)
    assert again.exit_code == 0 and "1 jobs: 0 done, 1 already done" in again.output, again.output


def test_dry_run_reports_every_bad_line_before_any_model_work(tmp_path, data_dir, tiny_sd15_dir):
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("style", "horse.jpg", "watercolor-cat.jpg"),
        job_line("style", "horse.jpg", "missing.jpg"),
        {"task": "paint"},
        job_line("style", "horse.jpg", "wood-rings.jpg", steps=0),
        job_line("texture", "wood-rings.jpg", None, layers="0-99"),
        job_line("texture", "wood-rings.jpg", None, colour="red"),
        job_line("style", "horse.jpg", "watercolor-cat.jpg"),  # the same job as line 1
    ])
    with jobs.open("a") as f:
        f.write("{not json\n")
    for seed in (1, 2):  # two jobs, one id
        with jobs.open("a") as f:
            f.write(json.dumps({**job_line("texture", "wood-rings.jpg", None, seed=seed), "id": "mine"}) + "\n")
    for output in (".png", "", ".locks/x.png", "results.jsonl/x.png", "batch.json/x.png", "logs/x.png",
                   "results.shard-0-of-2.jsonl/x.png"):
        with jobs.open("a") as f:
            f.write(json.dumps(job_line("texture", "wood-rings.jpg", None, output=output)) + "\n")
    out = tmp_path / "out"
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--dry-run")
    assert result.exit_code == 2
    text = result.output
    for expected in ("line 2: style image", "missing.jpg' does not exist", "line 3: task 'paint' is not known",
                     "line 4: steps must be at least 1", "line 5: layers", "do not exist in this model",
                     "line 6: texture has no option 'colour'", "; and for every task: task, id, output, overwrite, "
                     "model, vae, config, allow_pickle, device, dtype, grid, perf", "line 7: the same job as line 1",
                     "line 8: not valid JSON", "line 10: id 'mine' is line 9's too; give each job its own id",
                     "line 11: output '.png' must have a name before .png", "line 12: output is empty",
                     "line 13: output '.locks/x.png' is under '.locks', which the runner keeps",
                     "line 14: output 'results.jsonl/x.png' is under 'results.jsonl'", "line 15: output 'batch.json",
                     "line 16: output 'logs/x.png'", "line 17: output 'results.shard-0-of-2.jsonl/x.png'", "2 ready",
                     "15 invalid"):
        assert expected in text, expected
    assert "Traceback" not in text
    assert not out.exists()  # nothing written, no model loaded


def test_a_dry_run_counts_jobs_that_failed_before_apart_from_the_ready_ones(tmp_path, data_dir, tiny_sd15_dir,
                                                                           monkeypatch):
    """A run skips a job recorded as failed unless --retry-failed; the dry run says so instead of "ready"."""
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("style", "horse.jpg", "watercolor-cat.jpg"),
                                                  job_line("texture", "wood-rings.jpg", None)])
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        failing_once(patch)
        run = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "-q")
    assert run.exit_code == 1 and "1 done" in run.output and "1 failed" in run.output, run.output
    dry = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "failed before (" in dry.output and "a run skips it unless --retry-failed" in dry.output
    assert "0 ready, 1 already done, 1 failed before (skipped without --retry-failed), 0 invalid" in dry.output
    retry = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--dry-run", "--retry-failed")
    assert retry.exit_code == 0 and "1 ready, 1 already done, 0 invalid" in retry.output, retry.output


def test_a_job_never_writes_over_its_own_input(tmp_path, data_dir, tiny_sd15_dir):
    out = tmp_path / "out"
    out.mkdir()
    Image.open(data_dir / "horse.jpg").save(out / "horse.png")  # an earlier result, restyled again
    (out / "notes").write_text("a file where a job wants a folder")
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("style", "../out/horse.png", "wood-rings.jpg", output="horse.png", overwrite=True),
        job_line("style", "golden-gate.jpg", "wood-rings.jpg", output="notes/gate.png")])
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--dry-run")
    assert result.exit_code == 2 and "horse.png' is an input of this run" in result.output, result.output
    assert "notes' is a file, not a folder" in result.output


def test_a_batch_that_fails_after_saving_some_images_reruns_them_as_its_own(tmp_path, data_dir, tiny_sd15_dir,
                                                                            monkeypatch):
    """The one-by-one rerun of a failed batch takes the batch's saved images for the jobs' own leftovers, not
    for files that appeared while they ran."""
    disk_full_at_the_second_save(monkeypatch)
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("style", c, "wood-rings.jpg", size="64x64", output=f"{Path(c).stem}.png")
        for c in ("horse.jpg", "golden-gate.jpg")])
    out = tmp_path / "out"
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--group", 2)
    assert result.exit_code == 0 and "running its jobs one by one" in result.output, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["golden-gate.png", "horse.png"]
    assert len(done_records(out)) == 2


def test_bad_batch_command_lines(tmp_path, eight_jobs):
    cases = [(["batch", tmp_path / "nope.jsonl", "--out", tmp_path / "o"], "jobs file"),
             (["batch", eight_jobs], "--out DIR"),
             (["batch", eight_jobs, "--out", tmp_path / "o", "--shard", "3/2"], "shard '3/2'"),
             (["batch", "--merge", tmp_path / "empty"], "does not exist")]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, args


def test_lock_excludes_live_owner_and_breaks_stale_one(tmp_path):
    first, second = JobLock(tmp_path, "job"), JobLock(tmp_path, "job")
    assert first.acquire() and not second.acquire()  # held by this (live) process
    first.release()
    assert second.acquire()
    second.release()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = JobLock(tmp_path, "job2")
    lock.path.parent.mkdir(exist_ok=True)
    lock.path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "start": None}))
    assert lock.acquire() and lock.owner()["pid"] == os.getpid()  # the dead owner's lock was taken over
    lock.release()

    recycled = JobLock(tmp_path, "job3")  # our own PID but another start time: a recycled PID
    recycled.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": "1"}))
    assert recycled.acquire()
    recycled.release()

    unreadable = JobLock(tmp_path, "job5")  # being written, or its writer died right after creating it
    unreadable.path.write_text("{not json")
    assert not unreadable.acquire()  # young: its writer may still be writing it
    old = time.time() - 2 * STALE_AFTER_S
    os.utime(unreadable.path, (old, old))
    assert unreadable.acquire()
    unreadable.release()

    remote = JobLock(tmp_path, "job4")  # another machine's lock cannot be checked: respected, even where
    for pid in (1, int(dead.stdout)):  # its PID is alive here, or dead here
        remote.path.write_text(json.dumps({"pid": pid, "host": "other-node", "start": None}))
        assert not remote.acquire() and remote.path.exists()


def test_results_survive_a_torn_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, {"job": "a", "status": "done", "time": 1})
    with path.open("ab") as f:
        f.write(b'{"job": "b", "sta')  # a crash in the middle of a write
    append_record(path, {"job": "c", "status": "done", "time": 2})
    assert [r["job"] for r in read_records(tmp_path)] == ["a", "c"]


def test_model_options_change_the_job_id(eight_jobs, tmp_path):
    """Results of one model are never taken for another's: the model is part of a job's identity."""
    a = read_jobs(eight_jobs, out_dir=tmp_path, defaults=ModelSpec(source="x/model-a"))
    b = read_jobs(eight_jobs, out_dir=tmp_path, defaults=ModelSpec(source="x/model-b"))
    c = read_jobs(eight_jobs, out_dir=tmp_path, defaults=ModelSpec(source="x/model-a", device="cuda:1"))
    d = read_jobs(eight_jobs, out_dir=tmp_path, defaults=ModelSpec(source="x/model-a", perf=(("vae_tiling", True),)))
    assert {j.id for j in a}.isdisjoint({j.id for j in b})
    assert [j.id for j in a] == [j.id for j in c]
    assert {j.id for j in a}.isdisjoint({j.id for j in d})  # a flag that changes pixels: other results
    assert all(j.model.perf == (("vae_tiling", True),) for j in d)


def test_a_group_held_by_another_process_is_skipped_without_a_failed_batch(tmp_path, data_dir, tiny_sd15_dir):
    """Every job of a batch held by another live process: they are counted as running elsewhere; the batch
    read its first runnable job and failed with an IndexError that it reported as a failed batch."""
    jobs = [job_line("style", c, "watercolor-cat.jpg", steps=1, size=64) for c in ("horse.jpg", "golden-gate.jpg")]
    jobs_file = write_jobs(tmp_path / "in", data_dir, jobs)
    out = tmp_path / "out"
    held = [JobLock(out, job.id) for job in read_jobs(jobs_file, out_dir=out,
                                                       defaults=ModelSpec(source=str(tiny_sd15_dir)))]
    assert all(lock.acquire() for lock in held)
    try:
        result = invoke("batch", jobs_file, "--out", out, "--model", tiny_sd15_dir, "--group", 2)
    finally:
        for lock in held:
            lock.release()
    assert result.exit_code == 0, result.output
    assert "2 running elsewhere" in result.output and "failed (" not in result.output


def test_an_edited_line_that_still_cannot_run_shows_its_new_error(tmp_path, data_dir, tiny_sd15_dir):
    jobs_file = write_jobs(tmp_path / "in", data_dir, [job_line("style", "horse.jpg", "watercolor-cat.jpg",
                                                                steps="2")])
    out = tmp_path / "out"
    assert '(got "2")' in invoke("batch", jobs_file, "--out", out, "--model", tiny_sd15_dir).output
    jobs_file.write_text(json.dumps(job_line("style", "horse.jpg", "watercolor-cat.jpg", steps=2.5)) + "\n")
    result = invoke("batch", jobs_file, "--out", out, "--model", tiny_sd15_dir, "-q")
    assert result.exit_code == 1 and "2.5" in result.output and "failed before" not in result.output


def test_each_image_of_a_batch_records_its_own_jobs_seed(tmp_path, data_dir, tiny_sd15_dir):
    jobs = [job_line("style", "horse.jpg", "watercolor-cat.jpg", steps=1, size=64, seed=5),
            job_line("style", "golden-gate.jpg", "watercolor-cat.jpg", steps=1, size=64)]  # the default seed, 0
    out = tmp_path / "out"
    result = invoke("batch", write_jobs(tmp_path / "in", data_dir, jobs), "--out", out, "--model", tiny_sd15_dir,
                    "--group", 2, "-q")
    assert result.exit_code == 0, result.output
    seeds = {read_parameters(png)["content"].rsplit("/", 1)[-1]: read_parameters(png)["seed"]
             for png in out.rglob("*.png")}
    assert seeds == {"horse.jpg": 5, "golden-gate.jpg": 0}


def test_style_jobs_sharing_a_style_run_as_one_batch_with_the_same_results(tmp_path, data_dir, tiny_sd15_dir):
    """--group: jobs sharing style and settings are optimised together; each image matches its solo run."""
    jobs = [job_line("style", c, "watercolor-cat.jpg", steps=3, seed=0)
            for c in ("horse.jpg", "golden-gate.jpg", "wood-rings.jpg")]
    jobs.append(job_line("appearance", "horse.jpg", "wood-rings.jpg"))  # not batchable: runs alone
    jobs_file = write_jobs(tmp_path / "in", data_dir, jobs)
    images = {}
    for group in (1, 3):
        out = tmp_path / f"out-{group}"
        result = invoke("batch", jobs_file, "--out", out, "--model", tiny_sd15_dir, "--device", "cpu",
                        "--group", group, "--quiet")
        assert result.exit_code == 0, result.output
        records = [r for r in read_records(out) if r["status"] == "done"]
        assert len(records) == 4
        assert sum(1 for r in records if r.get("batched") == 3) == (3 if group == 3 else 0)
        for png in sorted(out.rglob("*.png")):
            params = read_parameters(png)
            # a batched result says so: rerun alone it matches to rounding, not bit for bit
            assert params.get("batched") == (3 if group == 3 and params["task"] == "style" else None)
            with Image.open(png) as img:
                images.setdefault(params["job"], []).append(np.asarray(img, np.float32) / 255)
    assert len(images) == 4
    for solo, batched in images.values():
        assert np.abs(solo - batched).max() <= 2 / 255


@pytest.mark.parametrize("command", [
    ["style", "{data}/horse.jpg", "{data}/watercolor-cat.jpg", "--steps", "3", "--content-weight", "0.4",
     "--seed", "5"],
    ["t2i", "--prompt", "a red barn", "--style", "{data}/watercolor-cat.jpg", "--steps", "2", "--iters", "1",
     "--num-images", "2", "--seed", "3"],
    ["t2i", "--prompt", "a red barn", "--style", "{data}/watercolor-cat.jpg", "--steps", "2", "--iters", "1",
     "--num-images", "2", "--grid", "--seed", "3"],
    ["texture", "{data}/wood-rings.jpg", "--num", "2", "--size", "96x64", "--steps", "2", "--vae", "{model}/vae",
     "--seed", "4"],
    ["texture", "{data}/horse.jpg", "--mode", "sample", "--tile", "x", "--size", "96x64", "--steps", "2",
     "--iters", "1", "--reference-fit", "keep", "--seed", "6"],
    ["style", "{data}/horse.jpg", "{data}/watercolor-cat.jpg", "--steps", "2", "--vae-tiling", "--channels-last",
     "--no-fused", "--seed", "7"],
])
def test_info_job_reruns_a_result_to_the_same_pixels(command, tmp_path, data_dir, tiny_sd15_dir, monkeypatch):
    """Any result can be reproduced: ``info --job`` + ``batch`` rerun it exactly (CPU, fp32), sizes that are
    no multiple of 64, a swapped-in VAE and a grid included."""
    monkeypatch.chdir(data_dir.parent)  # inputs recorded relative to here; the job makes them absolute
    args = [a.replace("{data}", "data").replace("{model}", str(tiny_sd15_dir)) for a in command]
    size = [] if "--size" in args else ["--size", "64"]
    first = invoke(*args, "-o", tmp_path / "first.png", "-m", tiny_sd15_dir, *size, "-q")
    assert first.exit_code == 0, first.output
    originals = sorted(tmp_path.glob("first*.png"))
    monkeypatch.chdir(tmp_path)  # inputs were given relative to another folder: the result recorded where they are
    job = invoke("info", originals[0], "--job")
    assert job.exit_code == 0, job.output
    line = json.loads(job.stdout)
    task = args[0] + ("-sample" if "--mode" in args else "")
    assert line["task"] == task and line["model"] == str(tiny_sd15_dir) and line["seed"] == int(args[-1])
    if "--vae" in args:
        assert line["vae"] == str(tiny_sd15_dir / "vae")
    if "--grid" in args:
        assert line["grid"] is True and len(originals) == 1
    if "--tile" in args:
        assert line["tile"] == "x" and line["reference_fit"] == "keep"
    if "--vae-tiling" in args:  # speed switches that change pixels travel with the job; the runner sets them
        assert line["perf"] == {"vae_tiling": True, "channels_last": True, "fused": False}
    (tmp_path / "jobs.jsonl").write_text(json.dumps({**line, "output": "rerun.png"}) + "\n")
    assert invoke("batch", tmp_path / "jobs.jsonl", "--out", tmp_path / "out", "-q").exit_code == 0
    reruns = sorted((tmp_path / "out").glob("rerun*.png"))
    assert len(reruns) == len(originals) >= 1
    for a, b in zip(originals, reruns, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), (a, b)


def test_a_result_made_with_pickle_files_reruns_with_them(tmp_path, data_dir, tiny_sd15_dir):
    """``--allow-pickle`` travels with the result: ``info --job`` keeps it and the batch runner hands it to the
    ControlNet's load as well as the model's (a pickle ControlNet failed every batch run before)."""
    from diffusers import ControlNetModel

    from attndistill.testing import build_tiny_controlnet

    ControlNetModel.from_pretrained(build_tiny_controlnet(tmp_path / "cn")).save_pretrained(
        tmp_path / "cn-bin", safe_serialization=False)
    first = invoke("t2i", "--style", data_dir / "wood-rings.jpg", "--prompt", "a b",
                   "--controlnet", tmp_path / "cn-bin", "--control-image", data_dir / "horse.jpg", "--allow-pickle",
                   "-o", tmp_path / "first.png", "-m", tiny_sd15_dir, "--size", "64", "--steps", "2", "--iters", "1",
                   "-q")
    assert first.exit_code == 0, first.output
    line = json.loads(invoke("info", tmp_path / "first.png", "--job").stdout)
    assert line["allow_pickle"] is True
    (tmp_path / "jobs.jsonl").write_text(json.dumps({**line, "output": "rerun.png"}) + "\n")
    rerun = invoke("batch", tmp_path / "jobs.jsonl", "--out", tmp_path / "out", "-q")
    assert rerun.exit_code == 0, rerun.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "first.png")),
                          np.asarray(Image.open(tmp_path / "out" / "rerun.png")))


def test_info_job_refuses_what_cannot_be_rerun():
    from attndistill.batch.jobs import job_from_parameters

    with pytest.raises(UserError, match="passed in memory"):
        job_from_parameters({"task": "style", "content": "<image>", "style": ["a.png"], "model": "m"})
    with pytest.raises(UserError, match="cannot rerun"):
        job_from_parameters({"task": "finetune-vae"})



def test_info_job_keeps_the_dtype_a_result_was_made_in():
    """bf16 and fp16 change pixels; on the CPU fp32 is the default too, so the rerun tests cannot see this."""
    from attndistill.batch.jobs import job_from_parameters

    for recorded, option in (("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32")):
        job = job_from_parameters({"task": "style", "content": "c.png", "style": ["s.png"], "dtype": recorded})
        assert job["dtype"] == option


def test_dry_run_checks_controlnets_and_strength(tmp_path, data_dir, tiny_sd15_dir):
    """ControlNet paths are relative to the jobs file and checked (exists, fits the model) before any work,
    as is a strength that leaves no step to run."""
    from attndistill.testing import build_tiny_controlnet

    build_tiny_controlnet(tmp_path / "cn15", sdxl=False)
    build_tiny_controlnet(tmp_path / "cnxl", sdxl=True)
    for name in ("cn15", "cnxl"):  # single weights files, as many ControlNets are shared
        (tmp_path / f"{name}.safetensors").write_bytes((tmp_path / name / "diffusion_pytorch_model.safetensors")
                                                       .read_bytes())

    def t2i(controlnet):
        return {"task": "t2i", "prompt": "a b", "style": "watercolor-cat.jpg", "controlnet": controlnet,
                "control_image": "horse.jpg", "size": 64, "steps": 1}

    jobs = write_jobs(tmp_path / "in" / "sub", data_dir, [
        t2i("../../cn15"),
        t2i("../../no-such-cn"),
        t2i("../../cnxl"),
        {"task": "texture", "reference": "wood-rings.jpg", "layout": "horse.jpg", "strength": 0.01, "steps": 5},
        t2i("../../cn15.safetensors"),
        t2i("../../cnxl.safetensors"),
    ])
    result = invoke("batch", jobs, "--out", tmp_path / "out", "-m", tiny_sd15_dir, "--dry-run")
    assert result.exit_code == 2
    for expected in ("line 2: ControlNet", "no-such-cn' does not exist", "line 3: ControlNet",
                     "does not fit the sd15 model", "line 4: strength 0.01 leaves no step", "2 ready", "4 invalid",
                     "line 6: ControlNet", "cnxl.safetensors' (for SDXL) does not fit the sd15 model"):
        assert expected in result.output, expected
    job = read_jobs(jobs, out_dir=tmp_path / "out")[0]
    assert job.args["controlnet"] == str((tmp_path / "cn15").resolve())


def test_dry_run_catches_what_would_fail_within_a_second(tmp_path, data_dir, tiny_sd15_dir):
    """Everything a run would refuse before its first step is known to --dry-run, one 'line N:' per bad line;
    an unusual value (a number for layers, a bogus device) is that line's error, never the run's."""
    texture = {"task": "texture", "reference": "wood-rings.jpg", "size": 64, "steps": 1}
    sample = {**texture, "mode": "sample"}
    t2i = {"task": "t2i", "prompt": "a b", "style": "watercolor-cat.jpg", "size": 64, "steps": 1}
    jobs = write_jobs(tmp_path / "in", data_dir, [
        {**texture, "device": "bogus"},
        {**texture, "layers": 5},
        {**texture, "tile": "q"},
        {**texture, "size": 100000},
        {**texture, "seed": 99999999999999999999},
        {**texture, "mode": "bogus"},
        {**texture, "output": "../escape.png"},
        {**texture, "output": str(tmp_path / "abs.png")},
        {**sample, "start_t": 5000},
        {**t2i, "control": "bogus"},
        {"task": "expand", "reference": "wood-rings.jpg", "size": 256, "steps": 1},
        {"task": "expand", "reference": "wood-rings.jpg", "steps": 1},
        {"task": "texture", "reference": "wood-rings.jpg", "layout": "horse.jpg", "strength": 5},
        {**texture, "layers": [4, 5], "tile": "xy", "size": 4096, "seed": 7},  # fine
        {"task": "expand", "reference": "wood-rings.jpg", "size": [1024, 512], "steps": 1},  # fine
    ])
    with jobs.open("a") as f:  # Python's json reads NaN and Infinity, which no run can use
        f.write('{"task": "t2i", "prompt": "a b", "style": "watercolor-cat.jpg", "guidance": NaN}\n')
        f.write('{"task": "texture", "reference": "wood-rings.jpg", "lr": Infinity}\n')
        f.write(json.dumps({**texture, "perf": {"warp_drive": True}}) + "\n")
        f.write(json.dumps({**texture, "perf": {"channels_last": "yes"}}) + "\n")
        f.write(json.dumps({**texture, "output": "a\0b.png"}) + "\n")  # mkstemp's ValueError, after the run
        f.write(json.dumps({"task": "style", "content": ["horse.jpg"], "style": "watercolor-cat.jpg"}) + "\n")
        f.write(json.dumps({**sample, "start_t": 1}) + "\n")  # below every timestep: from the scheduler's config
        f.write(json.dumps({**t2i, "prompt": "  "}) + "\n")
        f.write(json.dumps({**texture, "steps": 5000}) + "\n")
        # one setting twice: json, and the key's spellings, kept the last silently
        f.write('{"task": "texture", "reference": "wood-rings.jpg", "steps": 2, "steps": 3}\n')
        f.write(json.dumps({**texture, "content_weight": 0.3, "content-weight": 0.5}) + "\n")
        f.write(json.dumps({**texture, "seed": 1, "output": "sub.png"}) + "\n")  # fine
        f.write(json.dumps({**texture, "seed": 2, "output": "sub.png/x.png"}) + "\n")  # failed in the run only
    out = tmp_path / "out"
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--dry-run")
    assert result.exit_code == 2, result.output
    text = result.output
    for expected in ("line 1: device 'bogus'", "use cpu, cuda, cuda:N or auto",
                     "line 2: 'layers' must be a range like \"10-15\" or a list", "line 3: tile 'q' is not understood",
                     "line 4: size 100000x100000 is too large for one canvas", "line 5: seed 99999999999999999999 is "
                     "out of range", "line 6: unknown 'mode' 'bogus'", "line 7: output '../escape.png' is "
                     "outside the output folder", "line 8: output '", "line 9: 'start_t' must be in 1..1000",
                     "line 10: control 'bogus' is not known", "line 11: size 256x256 is smaller than one view",
                     "line 12: expand needs 'size'", "line 13: strength must be in (0, 1]",
                     "line 16: 'guidance' must be a finite number", "line 17: 'lr' must be a finite number",
                     "line 18: 'perf' must be an object of speed switches", "line 19: 'perf': channels_last must be "
                     "True or False", "line 20: 'output' holds a NUL character",
                     "line 21: 'content' takes one image: a path relative to the jobs file, not a list",
                     "line 22: 'start_t' 1 leaves no step for AD", "raise 'start_t' above", "line 23: prompt is empty",
                     "line 24: steps must be at most 1000, the model's training timesteps",
                     "line 25: 'steps' is given twice; keep one",
                     "line 26: 'content_weight' and 'content-weight' name the same setting; keep one",
                     "line 28: its output and line 27's are a file and a folder of the same name",
                     "3 ready", "25 invalid"):
        assert expected in text, expected
    assert "line 8: output '" + str(tmp_path / "abs.png") + "' is outside the output folder" in text
    assert "unexpected" not in text and "Traceback" not in text
    assert not out.exists() and not (tmp_path / "escape.png").exists()


def test_dry_run_knows_crops_and_masks_that_depend_on_the_models_sizes(tmp_path, data_dir, tiny_sd15_dir):
    """Before any model: a reference that reference fit keep would cut to a sliver, and a mask whose white covers
    no latent cell of the result (both need the model's sizes, read from its configs)."""
    folder = tmp_path / "in"
    style = {"task": "style", "content": "horse.jpg", "style": "watercolor-cat.jpg", "size": 64}
    jobs = write_jobs(folder, data_dir, [
        {"task": "style", "content": "horse.jpg", "style": ["tall.png", "thin.png"], "reference_fit": "keep"},
        {"task": "style", "content": "horse.jpg", "style": ["tall.png", "thin.png"]},  # squash: fine
        {"task": "texture", "reference": ["wood-rings.jpg", "horse.jpg"], "reference_fit": "keep"},  # fine
        {**style, "mask": "dot.png"},
        {**style, "mask": "half.png"},  # fine
    ])
    Image.new("RGB", (20, 2000)).save(folder / "tall.png")
    Image.new("RGB", (2000, 20)).save(folder / "thin.png")
    w, h = Image.open(folder / "horse.jpg").size
    dot, half = Image.new("L", (w, h)), Image.new("L", (w, h))
    dot.paste(255, (w // 2, h // 2, w // 2 + 2, h // 2 + 2))  # a few pixels: under one 8x8 cell at 64 px
    half.paste(255, (0, 0, w // 2, h))
    dot.save(folder / "dot.png")
    half.save(folder / "half.png")
    result = invoke("batch", jobs, "--out", tmp_path / "out", "-m", tiny_sd15_dir, "--dry-run")
    text = result.output
    assert result.exit_code == 2 and "line 1: reference '" in text and "thin.png' keeps only" in text, text
    assert "line 4: mask '" in text and "marks no region" in text
    assert "or give a larger 'size'" in text and "--size" not in text  # a job line's words
    assert "3 ready" in text and "2 invalid" in text


def test_a_texture_lines_mode_is_never_dropped(tmp_path, data_dir):
    """Label maps run masked optimisation and a layout runs sampling, as on the command line: a 'mode' that
    says otherwise, or one that is no mode at all, is that line's error, not silently ignored."""
    from attndistill.batch.jobs import _texture_task

    labels = {"ref_labels": ["r.png"], "target_labels": "t.png"}
    assert _texture_task({**labels}) == _texture_task({**labels, "mode": "optimize"}) == "texture-masked"
    layout = {"layout": "l.png"}
    assert _texture_task({**layout}) == _texture_task({**layout, "mode": "sample"}) == "texture-layout"
    assert _texture_task({"mode": "sample"}) == "texture-sample" and _texture_task({}) == "texture"
    for raw, message in (({**labels, "mode": "sample"}, "run masked optimisation"),
                         ({**labels, "mode": "banana"}, "unknown 'mode' 'banana'"),
                         ({**layout, "mode": "optimize"}, "runs AD-guided sampling")):
        with pytest.raises(UserError, match=message):
            _texture_task(raw)


def test_line_errors_name_the_jobs_keys_not_the_commands_options():
    from attndistill.batch.jobs import job_words

    assert job_words("--ref-labels/--target-labels need --mode optimize; or pass --no-cuda-graphs (a-b--c)") == \
        "'ref_labels'/'target_labels' need 'mode' optimize; or pass 'cuda_graphs': false (a-b--c)"
    for kept in ("paths are relative to --out", "image '/data/--size.png' and '--x.png'", "lr --5",
                 "prompt is empty ('attndistill texture --mode sample' generates from the style alone)"):
        assert job_words(kept) == kept  # the batch command's own options, paths, numbers


def test_one_line_that_breaks_a_check_fails_only_itself(tmp_path, data_dir, tiny_sd15_dir, monkeypatch):
    """A check raising something unforeseen makes that job invalid ('line N: ...'); the others still run."""
    from attndistill.tasks import setup

    real = setup.check_run

    def broken(*, seed, **kwargs):
        if seed == 13:
            raise RuntimeError("boom")
        return real(seed=seed, **kwargs)

    monkeypatch.setattr(setup, "check_run", broken)
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("texture", "wood-rings.jpg", None, seed=13),
                                                  job_line("texture", "wood-rings.jpg", None, output="ok.png")])
    out = tmp_path / "out"
    dry = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--dry-run")
    assert dry.exit_code == 2 and "line 1: this job cannot be checked (unexpected RuntimeError: boom)" in dry.output
    assert "1 ready" in dry.output and "1 invalid" in dry.output
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert result.exit_code == 1 and "1 done" in result.output and "1 failed" in result.output, result.output
    assert (out / "ok.png").is_file()


def test_jobs_file_with_a_bom_and_misplaced_paths(tmp_path, data_dir):
    """Notepad's UTF-8 BOM is accepted; a folder for the jobs file or a file for --merge says what to pass."""
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("texture", "wood-rings.jpg", None)])
    jobs.write_bytes(b"\xef\xbb\xbf" + jobs.read_bytes())
    [job] = read_jobs(jobs, out_dir=tmp_path / "out")
    assert job.error is None and job.task == "texture"

    folder = invoke("batch", tmp_path / "in", "--out", tmp_path / "out")
    assert folder.exit_code == 2 and "is a directory; pass the .jsonl jobs file itself" in folder.output
    assert str(jobs) in folder.output and "does not exist" not in folder.output
    for stream in ("-", "/dev/null"):  # stdin or a pipe: there is no folder for the jobs' relative paths
        piped = invoke("batch", stream, "--out", tmp_path / "out")
        assert piped.exit_code == 2 and "is not a regular file; save the jobs to a .jsonl file" in piped.output
    (tmp_path / "res").mkdir()
    results = tmp_path / "res" / "results.jsonl"
    append_record(results, {"job": "a", "status": "done", "time": 1})
    merge = invoke("batch", "--merge", results)
    assert merge.exit_code == 2 and "is a file, not a folder" in merge.output
    assert f"pass its folder '{tmp_path / 'res'}'" in merge.output and "Traceback" not in merge.output


@pytest.mark.parametrize("size", [None, 64])
def test_style_jobs_batch_only_with_contents_of_their_aspect(tmp_path, data_dir, tiny_sd15_dir, size):
    """Without a WxH size a result takes its content's aspect: a batch would give every job the first one's."""
    from attndistill.batch.jobs import run_order
    from attndistill.batch.runner import _batches

    folder = tmp_path / "in"
    folder.mkdir()
    Image.open(data_dir / "horse.jpg").crop((0, 0, 768, 400)).save(folder / "wide.jpg")
    Image.open(data_dir / "horse.jpg").crop((0, 0, 400, 768)).save(folder / "tall.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, shown tall
    Image.open(data_dir / "horse.jpg").crop((0, 0, 768, 400)).save(folder / "turned.jpg", exif=exif)
    contents = ["golden-gate.jpg", "wide.jpg", "watercolor-cat.jpg", "tall.jpg", "turned.jpg"]
    jobs_file = write_jobs(folder, data_dir, [
        {**{k: v for k, v in job_line("style", c, "wood-rings.jpg").items() if k != "size"},
         **({"size": size} if size else {})} for c in contents])
    jobs = read_jobs(jobs_file, out_dir=tmp_path / "out")
    chunks = [[Path(j.args["content"]).name for j in chunk] for chunk in _batches(jobs, 8)]
    assert chunks == [["golden-gate.jpg"], ["wide.jpg"], ["watercolor-cat.jpg"], ["tall.jpg", "turned.jpg"]]
    # with the model's configs the checks plan each result's size: equal sizes batch, whatever the aspect
    from attndistill.batch.check import Validator

    planned = read_jobs(jobs_file, out_dir=tmp_path / "out", defaults=ModelSpec(source=str(tiny_sd15_dir)))
    for job in planned:
        Validator(tmp_path / "out").check(job)
    sizes = {Path(j.args["content"]).name: j.planned_size for j in planned}
    assert sizes["golden-gate.jpg"] == sizes["watercolor-cat.jpg"] != sizes["wide.jpg"] != sizes["tall.jpg"]
    assert sizes["tall.jpg"] == sizes["turned.jpg"]
    planned = run_order(planned)
    chunks = [sorted(Path(j.args["content"]).name for j in chunk) for chunk in _batches(planned, 8)]
    assert sorted(chunks) == [["golden-gate.jpg", "watercolor-cat.jpg"], ["tall.jpg", "turned.jpg"], ["wide.jpg"]]
    if size:  # a WxH size makes every result the same shape: then any contents may share a batch
        jobs = read_jobs(write_jobs(folder, data_dir, [job_line("style", c, "wood-rings.jpg", size="64x32")
                                                       for c in contents]), out_dir=tmp_path / "out")
        assert [len(chunk) for chunk in _batches(jobs, 8)] == [5]
        # tiling and VAE* batch too, with the jobs that share them
        lines = [job_line("style", c, "wood-rings.jpg", size="64x32", **extra) for c in contents[:4]
                 for extra in ({"tile": "x", "tune_vae": True}, {})]
        jobs = read_jobs(write_jobs(folder, data_dir, lines), out_dir=tmp_path / "out")
        jobs = run_order(jobs)
        assert sorted(len(chunk) for chunk in _batches(jobs, 8)) == [4, 4]


def test_jobs_of_one_setting_run_together_where_the_first_of_them_stands(tmp_path, data_dir):
    """Run order: one reference's jobs together, and within them the jobs of one setting (which may share a
    batch) at the place of their first line; otherwise the file's order."""
    from attndistill.batch.jobs import run_order

    lines = [job_line("style", c, "wood-rings.jpg", steps=s)
             for c, s in (("horse.jpg", 3), ("golden-gate.jpg", 1), ("watercolor-cat.jpg", 3))]
    lines.insert(1, job_line("style", "horse.jpg", "watercolor-cat.jpg", steps=1))  # another reference
    jobs = read_jobs(write_jobs(tmp_path / "in", data_dir, lines), out_dir=tmp_path / "out")
    ordered = [(Path(j.args["content"]).name, j.args["steps"]) for j in run_order(jobs)
               if Path(j.args["style"]).name == "wood-rings.jpg"]
    assert ordered == [("horse.jpg", 3), ("watercolor-cat.jpg", 3), ("golden-gate.jpg", 1)]
    assert len(run_order(jobs)) == 4


def test_a_finished_jobs_lock_left_by_a_killed_run_is_cleared(tmp_path, data_dir, tiny_sd15_dir):
    """Killed after recording a job but before unlocking it: the next run skips the job and clears its lock."""
    import subprocess
    import sys

    jobs_file = write_jobs(tmp_path / "in", data_dir, [job_line(*PAIRS[0])])
    out = tmp_path / "out"
    assert invoke("batch", jobs_file, "--out", out, "-m", tiny_sd15_dir, "-q").exit_code == 0
    (job,) = read_jobs(jobs_file, out_dir=out, defaults=ModelSpec(source=str(tiny_sd15_dir)))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = JobLock(out, job.id)
    lock.path.parent.mkdir(exist_ok=True)
    lock.path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "start": None}))
    held = JobLock(out, "someone-else")
    assert held.acquire()  # a live owner's lock is never touched
    result = invoke("batch", jobs_file, "--out", out, "-m", tiny_sd15_dir)
    assert result.exit_code == 0 and "1 already done" in result.output
    assert not lock.path.exists() and held.path.exists()


def test_quiet_batches_still_say_what_failed(tmp_path, data_dir, tiny_sd15_dir):
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("texture", "wood-rings.jpg", None, steps=0)])
    result = invoke("batch", jobs, "--out", tmp_path / "out", "-m", tiny_sd15_dir, "-q")
    assert result.exit_code == 1 and "steps must be at least 1" in result.output
    jobs = write_jobs(tmp_path / "in2", data_dir, [job_line("texture", "wood-rings.jpg", None)])
    result = invoke("batch", jobs, "--out", tmp_path / "out2", "-m", tiny_sd15_dir, "--device", "cpu", "-q")
    assert result.exit_code == 0 and "1 jobs: 1 done, 0 already done, 0 failed" in result.output
    assert "shard 0/1" not in result.output and "done in" not in result.output  # -q: only the summary


def test_a_pixel_changing_flag_on_batch_makes_other_jobs(tmp_path, data_dir, tiny_sd15_dir):
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line(*PAIRS[5])])
    out = tmp_path / "out"
    assert invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "-q").exit_code == 0
    tiled = invoke("--vae-tiling", "batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert tiled.exit_code == 0 and "0 already done" in tiled.output  # not taken for the plain result
    params = sorted((read_parameters(p) for p in out.glob("*.png")), key=lambda p: "perf" in p)
    assert [p.get("perf") for p in params] == [None, {"vae_tiling": True}] and params[0]["job"] != params[1]["job"]


def test_out_of_memory_frees_the_models_graphs_for_the_next_job(tmp_path, data_dir, tiny_sd15_dir, monkeypatch):
    """A job that runs out of GPU memory fails alone, and the model's CUDA graphs (whose memory pools no other
    work can use) are dropped before the next job runs."""
    import torch

    from attndistill.model.models import DiffusionModel

    predict, released = DiffusionModel.predict, []

    def predict_or_run_out(self, latents, *args, **kwargs):
        if latents.shape[-1] == 16:  # the 128-pixel job's latents
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(self, latents, *args, **kwargs)

    def release_graphs(self):
        released.append(len(self.graphs))

    monkeypatch.setattr(DiffusionModel, "predict", predict_or_run_out)
    monkeypatch.setattr(DiffusionModel, "release_graphs", release_graphs)
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("texture", "wood-rings.jpg", None, steps=2, size=128, output="big.png"),
        job_line("texture", "wood-rings.jpg", None, steps=2, output="ok.png")])
    out = tmp_path / "out"
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert result.exit_code == 1
    records = {r["job"]: r for r in read_records(out)}
    statuses = sorted((r["status"], "ran out of memory" in (r.get("error") or "")) for r in records.values())
    assert statuses == [("done", False), ("failed", True)]
    assert len(released) == 1 and (out / "ok.png").is_file() and not (out / "big.png").exists()


def test_a_job_out_of_memory_beside_earlier_jobs_graphs_runs_again_without_them(tmp_path, data_dir, tiny_sd15_dir,
                                                                                monkeypatch):
    """Cached CUDA graphs of earlier jobs hold memory no other work can use: a job that runs out of memory
    beside them runs once more after they are dropped (simulated: CPU runs capture no graphs)."""
    import torch

    from attndistill.model.models import DiffusionModel

    predict = DiffusionModel.predict

    def predict_leaving_a_graph(self, *args, **kwargs):
        if self.graphs.get("earlier") == "before this job":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.graphs["earlier"] = "this job's"  # what a GPU job leaves cached for later jobs
        return predict(self, *args, **kwargs)

    def mark_earlier(self, job, tag, **kwargs):
        if self._model is not None and self._model.graphs:
            self._model.graphs["earlier"] = "before this job"
        return run(self, job, tag, **kwargs)

    from attndistill.batch.runner import Runner

    run = Runner._run
    monkeypatch.setattr(DiffusionModel, "predict", predict_leaving_a_graph)
    monkeypatch.setattr(Runner, "_run", mark_earlier)
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("texture", "wood-rings.jpg", None, output="one.png"),
        job_line("texture", "wood-rings.jpg", None, seed=1, output="two.png")])
    out = tmp_path / "out"
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir)
    assert result.exit_code == 0, result.output
    assert sorted(r["status"] for r in read_records(out)) == ["done", "done"]
    assert "dropped them, running it once more" in result.output


@pytest.mark.parametrize("group", [1, 2])
def test_an_output_that_appears_while_its_job_runs_is_kept_and_so_is_the_result(tmp_path, data_dir, tiny_sd15_dir,
                                                                                 monkeypatch, group):
    """Someone else's file at a job's output name is never replaced, and the job's work is not thrown away."""
    from attndistill.model.models import DiffusionModel

    out = tmp_path / "out"
    decode = DiffusionModel.decode

    def decode_while_a_file_appears(self, latents):
        out.mkdir(exist_ok=True)
        (out / "a.png").write_bytes(b"someone else's")
        return decode(self, latents)

    monkeypatch.setattr(DiffusionModel, "decode", decode_while_a_file_appears)
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("style", "horse.jpg", "wood-rings.jpg", output="a.png"),
        job_line("style", "golden-gate.jpg", "wood-rings.jpg", output="b.png")])
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--group", group)
    assert result.exit_code == 1
    assert (out / "a.png").read_bytes() == b"someone else's"
    records = {r["outputs"][0]: r for r in read_records(out)}
    assert records["b.png"]["status"] == "done" and records["b.png"].get("batched") == (2 if group == 2 else None)
    kept = records["a.new.png"]
    assert kept["status"] == "failed" and "a.png' appeared while the job ran" in kept["error"]
    assert read_parameters(out / "a.new.png")["job"] == kept["job"]
    (out / "a.new.png").replace(out / "a.png")  # as the message says: moved into place, the job counts as done
    again = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--group", group)
    assert again.exit_code == 0 and "2 already done" in again.output, again.output


def test_merge_names_the_jobs_no_shard_finished(tmp_path):
    """A shard that crashed leaves jobs with no record: --merge says which, and exits 1."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "batch.json").write_text(json.dumps({"jobs": ["a", "b"]}))
    append_record(out / "results.shard-0-of-2.jsonl", {"job": "a", "status": "done"})
    result = invoke("batch", "--merge", out)
    assert result.exit_code == 1, result.output
    assert "1 done, 0 failed, 1 without a result" in result.output and "first missing: b" in result.output


def test_dry_run_refuses_ids_outputs_and_flags_that_would_go_wrong(tmp_path, data_dir, tiny_sd15_dir):
    """Ids that are paths, two jobs writing one file, a string where a flag is meant, a foreign file in the way."""
    texture = {"task": "texture", "reference": "wood-rings.jpg", "size": 64, "steps": 1}
    jobs = write_jobs(tmp_path / "in", data_dir, [
        {**texture, "id": "a/b"},
        {**texture, "id": "a/../../x"},
        {**texture, "overwrite": "false"},  # a truthy string: it would overwrite
        {**texture, "seed": 1, "output": "same.png"},
        {**texture, "seed": 2, "output": "same.png"},
        {**texture, "seed": 3, "output": "taken.png"},
    ])
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "taken.png")  # not made by any job
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--dry-run")
    assert result.exit_code == 2, result.output
    for expected in ("line 1: id 'a/b' may only use letters", "line 2: id 'a/../../x' may only use letters",
                     'line 3: \'overwrite\' must be true or false (got "false")',
                     "line 5: writes the same output as line 4", "taken.png' already exists; delete it",
                     "1 ready", "5 invalid"):
        assert expected in result.output, expected
    assert sorted(p.name for p in out.iterdir()) == ["taken.png"]
    a_file = invoke("batch", jobs, "--out", out / "taken.png", "-m", tiny_sd15_dir, "--dry-run")
    assert a_file.exit_code == 2 and a_file.output.count("error") == 1, a_file.output
    assert f"output folder '{out / 'taken.png'}' is a file; choose another --out" in a_file.output


def test_a_group_takes_as_many_jobs_as_asked_and_only_jobs_of_one_model(tmp_path, data_dir, tiny_sd15_dir):
    """--group 2 over three batchable jobs: one batch of 2 and one job alone; a job whose own dtype differs
    never joins another model's batch."""
    style = [job_line("style", c, "watercolor-cat.jpg", seed=0) for c in ("horse.jpg", "golden-gate.jpg")]
    jobs = write_jobs(tmp_path / "in", data_dir, [*style, job_line("style", "wood-rings.jpg", "watercolor-cat.jpg",
                                                                 seed=0, steps=1)])
    out = tmp_path / "out"
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--device", "cpu", "--group", 2, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(r.get("batched") or 1 for r in read_records(out) if r["status"] == "done") == [1, 2, 2]

    mixed = write_jobs(tmp_path / "in2", data_dir, [style[0], {**style[1], "dtype": "bf16"}])
    out2 = tmp_path / "out2"
    result = invoke("batch", mixed, "--out", out2, "-m", tiny_sd15_dir, "--device", "cpu", "--group", 2, "--quiet")
    assert result.exit_code == 0, result.output
    records = [r for r in read_records(out2) if r["status"] == "done"]
    assert len(records) == 2 and not any(r.get("batched") for r in records)


def test_a_reused_model_takes_each_jobs_own_speed_switches(tmp_path, data_dir, tiny_sd15_dir):
    """One loaded model serves both jobs; the second's own pixel-changing switch is on for it alone."""
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("texture", "wood-rings.jpg", None, seed=1, output="plain.png"),
        job_line("texture", "wood-rings.jpg", None, seed=1, output="tiled-vae.png", perf={"vae_tiling": True}),
        job_line("texture", "wood-rings.jpg", None, seed=1, output="plain-again.png"),
    ])
    out = tmp_path / "out"
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    perf = {name: read_parameters(out / name).get("perf", {}) for name in ("plain.png", "tiled-vae.png",
                                                                           "plain-again.png")}
    assert perf["tiled-vae.png"].get("vae_tiling") is True
    assert not perf["plain.png"].get("vae_tiling") and not perf["plain-again.png"].get("vae_tiling")


def test_a_job_that_fails_as_it_runs_is_named_by_its_line_in_the_jobs_files_words(tmp_path, data_dir, tiny_sd15_dir,
                                                                                    monkeypatch):
    """What a run refuses (a message written for the CLI) reads as the jobs file's keys, with its line."""
    from attndistill.tasks import transfer

    def refuse(*args, **kwargs):
        raise UserError("checkpoint 'x.safetensors' has no VAE of its own; pass --vae with an AutoencoderKL folder")

    monkeypatch.setattr(transfer, "texture_synthesis", refuse)
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("texture", "wood-rings.jpg", None)])
    result = invoke("batch", jobs, "--out", tmp_path / "out", "-m", tiny_sd15_dir)
    said = "line 1: checkpoint 'x.safetensors' has no VAE of its own; pass 'vae' with an AutoencoderKL folder"
    assert result.exit_code == 1 and said in result.output
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[-1])
    assert record["status"] == "failed" and record["error"] == said


def test_a_dry_run_refuses_models_that_their_configs_and_tensor_names_show_unusable(tmp_path, data_dir, tiny_sd15_dir,
                                                                                   tiny_sdxl_dir):
    """All from configs and a checkpoint's header, no weights: an inpainting UNet, a checkpoint pruned of its VAE
    with no 'vae', a 'config' that is no folder or of another family."""
    import shutil

    from diffusers import UNet2DConditionModel
    from ldm_checkpoint import write_ldm_checkpoint
    from safetensors.torch import load_file, save_file

    from attndistill.testing import TINY_UNET

    inpaint = shutil.copytree(tiny_sd15_dir, tmp_path / "inpaint")
    shutil.rmtree(inpaint / "unet")
    UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9}).save_pretrained(inpaint / "unet")
    whole = write_ldm_checkpoint(tiny_sd15_dir, tmp_path / "sd.safetensors")
    save_file({k: v for k, v in load_file(whole).items() if not k.startswith("first_stage_model.")},
              tmp_path / "pruned.safetensors")
    texture = job_line("texture", "wood-rings.jpg", None)
    jobs = write_jobs(tmp_path / "in", data_dir, [
        {**texture, "model": str(inpaint)},
        {**texture, "model": str(tmp_path / "pruned.safetensors"), "config": str(tiny_sd15_dir)},
        {**texture, "model": str(whole), "config": str(tmp_path / "no-such-folder")},
        {**texture, "model": str(whole), "config": str(tiny_sdxl_dir)},
        {**texture, "model": str(tmp_path / "pruned.safetensors"), "config": str(tiny_sd15_dir),
         "vae": str(tiny_sd15_dir / "vae"), "output": "ok.png"}])
    dry = invoke("batch", jobs, "--out", tmp_path / "out", "--dry-run")
    assert dry.exit_code == 2 and "1 ready" in dry.output and "4 invalid" in dry.output, dry.output
    for said in ("line 1: model '", "its UNet takes 9 input channels where its VAE's latents have 4",
                 "line 2: checkpoint '", "has no VAE of its own (a checkpoint pruned of its VAE); pass 'vae'",
                 "line 3: 'config' '", "is no folder; pass the diffusers folder",
                 "line 4: checkpoint '", "is an SD 1.x/2.x checkpoint but 'config' '"):
        assert said in dry.output, said


def test_a_misspelt_key_gets_the_key_it_was_meant_as(tmp_path):
    from attndistill.batch.jobs import ModelSpec, parse_job

    job = {"task": "texture", "reference": "wood.jpg", "stpes": 2, "guidence_rescale": 0.5, "colour": "red"}
    with pytest.raises(UserError) as caught:
        parse_job(job, line=3, base=tmp_path, out_dir=tmp_path / "out", defaults=ModelSpec())
    text = str(caught.value)
    assert text.startswith("line 3: texture has no option 'colour', 'guidence_rescale', 'stpes'; did you mean ")
    assert "did you mean 'steps' for 'stpes'?" in text and "'colour'?" not in text


def test_a_jobs_warnings_name_its_line_in_the_jobs_files_words(tmp_path, data_dir, tiny_sd15_dir, caplog):
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("texture", "wood-rings.jpg", None, mode="sample", guidance_rescale=0.5, id="rescaled")])
    with caplog.at_level("WARNING"):
        result = invoke("batch", jobs, "--out", tmp_path / "out", "-m", tiny_sd15_dir)
    assert result.exit_code == 0, result.output
    assert "line 1 (rescaled): guidance rescale 0.5 is not used: guidance 1 turns classifier-free guidance off " \
           "(raise 'guidance' above 1 to use it)" in caplog.text


def test_the_warnings_of_jobs_optimised_in_one_batch_name_all_their_lines(tmp_path, data_dir, tiny_sd15_dir, caplog):
    """A batch of style jobs runs as one optimisation: what it warns of names every line of the batch."""
    folder = tmp_path / "in"
    jobs = write_jobs(folder, data_dir, [job_line("style", c, "style.gif") for c in ("horse.jpg", "golden-gate.jpg")])
    frames = [Image.open(data_dir / "watercolor-cat.jpg").convert("RGB"), Image.open(data_dir / "horse.jpg")]
    frames[0].save(folder / "style.gif", save_all=True, append_images=frames[1:])  # a style of two frames
    with caplog.at_level("WARNING"):
        result = invoke("batch", jobs, "--out", tmp_path / "out", "-m", tiny_sd15_dir, "--group", 2)
    assert result.exit_code == 0, result.output
    assert "lines 1, 2 (one batch): style image '" in caplog.text and "has 2 frames; its first is used" in caplog.text
    assert "line 1 (style-horse-" in caplog.text and "\n" + "style image" not in caplog.text  # checked: named too


def test_loss_logs_write_each_jobs_own_losses_as_a_command_would(tmp_path, data_dir, tiny_sd15_dir):
    """--loss-logs: a research sweep's loss curves, one file a job, with what --loss-log writes for one command."""
    jobs = write_jobs(tmp_path / "in", data_dir, [
        job_line("style", "horse.jpg", "watercolor-cat.jpg", steps=3, id="a"),
        job_line("style", "golden-gate.jpg", "watercolor-cat.jpg", steps=2, iters=2, id="b"),
        {"task": "t2i", "prompt": "a barn", "style": "watercolor-cat.jpg", "size": 64, "steps": 2, "iters": 1,
         "id": "c"}])
    out = tmp_path / "out"
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--loss-logs", "-q")
    assert result.exit_code == 0, result.output
    rows = {job: [json.loads(line) for line in (out / "losses" / f"{job}.jsonl").read_text().splitlines()]
            for job in "abc"}
    assert [r["step"] for r in rows["a"]] == [1, 2, 3] and [r["step"] for r in rows["c"]] == [1, 2]
    assert all(set(r) >= {"timestep", "loss", "ad", "content"} for r in rows["a"])  # style: both terms
    assert [len(r["losses"]) for r in rows["b"]] == [2, 2]  # two Adam iterations a step
    assert all(isinstance(r["loss"], float) for r in rows["a"] + rows["b"] + rows["c"])
    assert {r["job"]: r.get("loss_log") for r in read_records(out)} == {j: f"losses/{j}.jsonl" for j in "abc"}
    # a command's loss log of the same run has the same rows
    command = tmp_path / "command.jsonl"
    alone = invoke("style", jobs.parent / "horse.jpg", jobs.parent / "watercolor-cat.jpg", "--size", 64, "--steps",
                   3, "-m", tiny_sd15_dir, "-o", tmp_path / "a.png", "--loss-log", command, "-q")
    assert alone.exit_code == 0, alone.output
    assert [json.loads(line) for line in command.read_text().splitlines()] == rows["a"]
    # done jobs are skipped again, and a job done without a log says so; records lost (a kill before them) are
    # recovered, naming the logs there are
    (out / "losses" / "c.jsonl").unlink()
    (out / "results.jsonl").unlink()
    again = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--loss-logs")
    assert again.exit_code == 0 and "3 already done" in again.output
    assert "1 of the jobs done before have no loss log" in again.output
    assert {r["job"]: (r["recovered"], r.get("loss_log")) for r in read_records(out)} == {
        "a": (True, "losses/a.jsonl"), "b": (True, "losses/b.jsonl"), "c": (True, None)}


def test_loss_logs_refuse_a_group_and_a_file_in_the_folders_place(tmp_path, data_dir, tiny_sd15_dir):
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("style", "horse.jpg", "watercolor-cat.jpg", id="a")])
    out = tmp_path / "out"
    for dry in ([], ["--dry-run"]):  # a dry run says what the run would
        grouped = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--loss-logs", "--group", 4, *dry)
        assert grouped.exit_code == 2 and "--loss-logs logs each job's own loss, and --group 4 optimises style " \
                                          "jobs as one loss; drop --group" in grouped.output
    out.mkdir()
    (out / "losses").write_text("mine")
    for dry in ([], ["--dry-run"]):
        blocked = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--loss-logs", *dry)
        assert blocked.exit_code == 2 and f"'{out / 'losses'}' is a file, and --loss-logs writes a folder of " \
                                          "that name" in blocked.output
    assert (out / "losses").read_text() == "mine" and not list(out.glob("*.png"))
    (out / "losses").unlink()
    (out / "losses").mkdir()
    (out / "losses" / "a.jsonl").write_text("my notes\n")  # not a loss log: kept, and the job refused before work
    for dry in (["--dry-run"], []):
        taken = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--loss-logs", *dry)
        assert taken.exit_code == (2 if dry else 1), taken.output
        assert f"invalid a: '{out / 'losses' / 'a.jsonl'}' exists and is not a loss log; move that file away or " \
               "run without --loss-logs" in taken.output
    assert (out / "losses" / "a.jsonl").read_text() == "my notes\n" and not list(out.glob("*.png"))
    assert "style:" not in taken.output  # no step ran


def test_a_job_that_diverges_still_logs_the_losses_before_it(tmp_path, data_dir, tiny_sd15_dir):
    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("style", "horse.jpg", "watercolor-cat.jpg", steps=12,
                                                           lr=1e30, id="blows-up")])
    out = tmp_path / "out"
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--loss-logs", "-q")
    assert result.exit_code == 1 and "became NaN/Inf at step 2 of 12" in result.output, result.output
    [record] = read_records(out)
    assert record["status"] == "failed" and record["loss_log"] == "losses/blows-up.jsonl"
    rows = [json.loads(line) for line in (out / "losses" / "blows-up.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] is None and not list(out.glob("*.png"))


def test_each_job_says_its_own_warnings_once_on_the_terminal(tmp_path, data_dir, tiny_sd15_dir, bare_root_logger):
    """Each input is read by the check and by the run: said once a job, and a second job's warning about the same
    file is its own line, naming its own line."""
    folder = tmp_path / "in"
    jobs = write_jobs(folder, data_dir, [job_line("style", c, "style.gif") for c in ("horse.jpg", "golden-gate.jpg")])
    frames = [Image.open(data_dir / "watercolor-cat.jpg").convert("RGB"), Image.open(data_dir / "horse.jpg")]
    frames[0].save(folder / "style.gif", save_all=True, append_images=frames[1:])
    with bare_root_logger():
        result = invoke("batch", jobs, "--out", tmp_path / "out", "-m", tiny_sd15_dir, "-q")
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "has 2 frames; its first is used" in line]
    assert [line.split(" (")[0] for line in said] == ["WARNING: line 1", "WARNING: line 2"], said


def test_a_job_that_fails_after_its_run_names_its_loss_log(tmp_path, data_dir, tiny_sd15_dir, monkeypatch):
    """Its log was written before the images: a failure while saving them leaves it, and the record says where."""
    from attndistill.batch import runner

    jobs = write_jobs(tmp_path / "in", data_dir, [job_line("texture", "wood-rings.jpg", None, id="tex")])
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "_save_result", lambda image, path, job, batched=1: (path, "its name was taken"))
    result = invoke("batch", jobs, "--out", out, "-m", tiny_sd15_dir, "--loss-logs", "-q")
    assert result.exit_code == 1 and "its name was taken" in result.output, result.output
    [record] = read_records(out)
    assert record["status"] == "failed" and record["loss_log"] == "losses/tex.jsonl"
    assert (out / "losses" / "tex.jsonl").read_text()
