"""What batch processes share on disk and in the environment: shards, results records, job locks.

Several processes (torchrun ranks, Slurm array tasks, a re-run after a crash) work on one output
folder. Each takes a deterministic slice of the jobs (:func:`select`), appends one JSON line per
finished job to its own results file (:func:`append_record`: one write and an fsync), and holds a
lock file, claimed by a hard link, while a job runs (:class:`JobLock`), so no job ever runs twice at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from ..errors import UserError

RESULTS = "results.jsonl"
LOCKS = ".locks"
LOGS = "logs"  # a failed job's traceback: logs/<job id>.txt
LOSSES = "losses"  # --loss-logs: losses/<job id>.jsonl
MANIFEST = "batch.json"


def runner_owns(name: str) -> bool:
    """Whether ``name``, at the top of the output folder, is the runner's own: its records, manifest, logs,
    loss logs or locks. A job's output under it broke the run after the job's work, and every run after it."""
    return name in (LOCKS, LOGS, LOSSES, MANIFEST) or re.fullmatch(r"results(\.shard-\d+-of-\d+)?\.jsonl", name) \
        is not None


#: A lock or break-lock file this old with unreadable contents is left over from a killed process.
STALE_AFTER_S = 60.0


class _Grouped(Protocol):
    group: str


J = TypeVar("J", bound=_Grouped)


# -- sharding --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """This process's part of the batch: ``index`` of ``count`` (0-based)."""

    index: int = 0
    count: int = 1
    local_rank: int | None = None  # torchrun/accelerate: which GPU of the node

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def results_name(self) -> str:
        return RESULTS if self.count == 1 else f"results.shard-{self.index}-of-{self.count}.jsonl"


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise UserError(f"shard '{text}' is not understood; use I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(match[1]), int(match[2])


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not a whole number") from None


def resolve_shard(option: str | None = None, env: Mapping[str, str] | None = None) -> Shard:
    """The shard of this process: ``--shard I/N`` or a Slurm array task, times the torchrun/accelerate rank.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE``) inside shard I of N, rank r of W runs part
    ``I * W + r`` of ``N * W``: a Slurm array of multi-GPU nodes splits the batch with no overlap.
    """
    env = os.environ if env is None else env
    if option:
        outer, outer_count = parse_shard(option)
    elif env.get("SLURM_ARRAY_TASK_COUNT"):
        step = max(1, _env_int(env, "SLURM_ARRAY_TASK_STEP", 1))
        outer = (_env_int(env, "SLURM_ARRAY_TASK_ID", 0) - _env_int(env, "SLURM_ARRAY_TASK_MIN", 0)) // step
        outer_count = _env_int(env, "SLURM_ARRAY_TASK_COUNT", 1)
        if not 0 <= outer < outer_count:
            raise UserError(f"Slurm array task {env.get('SLURM_ARRAY_TASK_ID')} is outside the array's "
                            f"{outer_count} tasks; pass --shard I/N explicitly")
    else:
        outer, outer_count = 0, 1
    world = max(1, _env_int(env, "WORLD_SIZE", 1))
    rank = _env_int(env, "RANK", 0)
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun or accelerate")
    local = _env_int(env, "LOCAL_RANK", -1) if world > 1 else -1
    return Shard(outer * world + rank, outer_count * world, None if local < 0 else local)


def select(jobs: Sequence[J], shard: Shard) -> list[J]:
    """This shard's jobs: a contiguous slice of the jobs in run order (:func:`~attndistill.batch.jobs.run_order`:
    by model, size, reference and settings, then line).

    Every shard sorts the same list the same way, so the slices cover each job exactly once, and jobs
    that share a model and a reference stay together.
    """
    from .jobs import run_order

    ordered = run_order(jobs)
    n = len(ordered)
    return ordered[shard.index * n // shard.count:(shard.index + 1) * n // shard.count]


def process_device(device: str, shard: Shard) -> str:
    """``auto`` under torchrun/accelerate with CUDA: this process's own GPU, ``cuda:LOCAL_RANK``."""
    if device == "auto" and shard.local_rank is not None:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{shard.local_rank % torch.cuda.device_count()}"
    return device


# -- results and locks -----------------------------------------------------------------------------

def append_record(path: Path, record: dict) -> None:
    """Append one JSON line with a single write and fsync: a crash loses at most this line."""
    data = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a line torn by a crash stays on its own line, unparsed
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(out_dir: Path) -> list[dict]:
    """Every record of every results file in ``out_dir`` (torn or foreign lines skipped), oldest first."""
    records = []
    for path in sorted(out_dir.glob("results*.jsonl")):
        for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("job"), str):
                records.append(record)
    unique = {(r["job"], r.get("pid"), r.get("time"), r.get("status")): r for r in records}  # merged copies
    return sorted(unique.values(), key=lambda r: r.get("time") or 0)


def latest(records: Iterable[dict]) -> dict[str, dict]:
    """The newest record of each job."""
    return {r["job"]: r for r in records}


def _start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (Linux), so a recycled PID is not mistaken for the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return start is None or now is None or now == start


class JobLock:
    """``DIR/.locks/ID.lock``, created atomically: while it exists no other process runs the job.

    A lock whose owner died (same host, PID gone or recycled) is stale and taken over; a lock from
    another host is respected (delete it by hand if that machine is gone).
    """

    def __init__(self, out_dir: Path, job_id: str) -> None:
        self.path = out_dir / LOCKS / f"{job_id}.lock"
        self.held = False

    def owner(self) -> dict:
        try:
            info = json.loads(self.path.read_text())
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> bool:
        """Take the lock; False when a live process holds it.

        The lock appears complete or not at all: its owner record is written to a private file that is
        then hard-linked to the lock's name (``link`` fails if the name exists), so a process killed at
        any moment never leaves an empty lock that others would have to wait out.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_dead_drafts()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
              "time": time.time()}
        draft = self.path.with_name(f".{self.path.name}.{os.getpid()}.draft")
        with open(draft, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            for attempt in range(2):
                try:
                    os.link(draft, self.path)
                except FileExistsError:
                    if attempt or not self._break_stale():
                        return False
                    continue
                self.held = True
                return True
            return False
        finally:
            draft.unlink(missing_ok=True)

    def _remove_dead_drafts(self) -> None:
        """Owner records left by processes killed between writing and linking them."""
        for draft in self.path.parent.glob(f".{self.path.name}.*.draft"):
            pid = draft.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _alive(int(pid), None):
                draft.unlink(missing_ok=True)

    def _stale(self, info: dict) -> bool:
        if not info:  # unreadable: its writer is still writing it, or died right after creating it
            return _age(self.path) > STALE_AFTER_S
        if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
            return False
        return not _alive(info["pid"], info.get("start"))

    def _break_stale(self) -> bool:
        """Remove a stale lock. A second O_EXCL file makes sure two processes never both take it over."""
        info = self.owner()
        if not self._stale(info):
            return False
        breaker = self.path.with_suffix(".break")
        try:
            os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            if _age(breaker) > STALE_AFTER_S:
                breaker.unlink(missing_ok=True)
            return False
        try:
            if self.owner() == info:
                self.path.unlink(missing_ok=True)
        finally:
            breaker.unlink(missing_ok=True)
        return True

    def remove_if_stale(self) -> None:
        """Remove the lock if its owner died: a job finished and recorded, its process killed before unlocking."""
        if self.path.exists():
            self._break_stale()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


@dataclass
class MergeSummary:
    """What :func:`merge_results` found: jobs done, failed, and listed in batch.json with no record."""

    done: int
    failed: int
    missing: list[str]
    path: Path

    def __str__(self) -> str:
        text = f"{self.done} done, {self.failed} failed, {len(self.missing)} without a result -> {self.path}"
        return text + (f" (first missing: {', '.join(self.missing[:3])})" if self.missing else "")


def merge_results(out_dir: str | os.PathLike) -> MergeSummary:
    """Merge every ``results*.jsonl`` of ``out_dir`` into ``results.jsonl``: the newest record per job.

    Run it after all shards have finished; it is idempotent.
    """
    from ..images import atomic_write

    out_dir = Path(out_dir)
    if out_dir.is_file():
        hint = f"its folder '{out_dir.parent}'" if out_dir.name.startswith("results") else "the --out folder of a batch"
        raise UserError(f"results folder '{out_dir}' is a file, not a folder; pass {hint} (the folder holding "
                        "results*.jsonl)")
    if not out_dir.is_dir():
        raise UserError(f"results folder '{out_dir}' does not exist; pass the --out folder of a batch")
    records = latest(read_records(out_dir))
    if not records:
        raise UserError(f"results folder '{out_dir}' has no results*.jsonl records; run a batch into it first")
    expected: list[str] = []
    with contextlib.suppress(OSError, ValueError):
        expected = list(json.loads((out_dir / MANIFEST).read_text())["jobs"])
    ordered = sorted(records.values(), key=lambda r: (r.get("line") or 0, r["job"]))
    text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in ordered)
    path = atomic_write(out_dir / RESULTS, lambda f: f.write(text.encode()), overwrite=True)
    statuses = [r.get("status") for r in ordered]
    return MergeSummary(done=statuses.count("done"), failed=statuses.count("failed"),
                        missing=[j for j in expected if j not in records], path=path)


# -- launchers ---------------------------------------------------------------------------------------

def launcher_rank(env: Mapping[str, str] | None) -> int:
    return _env_int(os.environ if env is None else env, "RANK", 0)


def wait_for_all_ranks(env: Mapping[str, str] | None) -> bool:
    """Under torchrun/accelerate: wait for every rank (gloo, CPU-only), so rank 0 can merge the results."""
    env = os.environ if env is None else env
    if _env_int(env, "WORLD_SIZE", 1) < 2 or not env.get("MASTER_ADDR"):
        return False
    import datetime

    import torch.distributed as dist

    if not dist.is_available():
        return False
    try:
        created = not dist.is_initialized()
        if created:
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        dist.barrier()
        if created:
            dist.destroy_process_group()
        return True
    except Exception as exc:  # the results are complete anyway; merging is one command away
        print(f"warning: could not wait for the other ranks ({exc}); run 'attndistill batch --merge DIR'",
              file=sys.stderr)
        return False
