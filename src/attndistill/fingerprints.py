"""Fingerprints of a result's input files: a result records its inputs by path, and a file saved again under the
same name (a content image edited, a VAE tuned again with ``finetune-vae --overwrite``) would make a rerun give
other pixels without a word. ``info`` compares them with the files as they are now."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path

#: Where a result's parameters keep the fingerprints: {parameter: digest, or a list of them}.
KEY = "input_sha256"
#: Parameters not fingerprinted: a model's, a single file's configs' and a ControlNet's gigabytes of weights
#: would take seconds to read after every run; their sources are recorded (and Hub ids are versioned there).
UNHASHED = frozenset({"model", "config", "controlnet"})
_CHUNK = 1 << 20
#: Digests by (path, size, modification time): a batch of results that share a VAE folder (hundreds of MB) reads
#: it once, not once per result; a file saved again gets a new time, and so a new digest.
_SEEN: dict[tuple[str, int, int], str] = {}
#: The running task's inputs' digests as they were read (absolute path -> digest): the result records these, not
#: the files as they are when it ends. A content image edited while the run went on was recorded as if used.
_READ: ContextVar[dict[str, str] | None] = ContextVar("attndistill_inputs_read", default=None)


@contextmanager
def inputs_as_read() -> Iterator[None]:
    """For a task's run: its results' fingerprints are those of the files it read (:func:`note_read`)."""
    token = _READ.set({})
    try:
        yield
    finally:
        _READ.reset(token)


def note_read(path: Path) -> None:
    """Called as an input file is read: its digest now is the one its result records (the first read's)."""
    read = _READ.get()
    if read is not None:
        key = os.path.abspath(path)
        if key not in read:
            with suppress(OSError):
                read[key] = file_digest(path)


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SEEN:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
        _SEEN[key] = digest.hexdigest()[:16]
    return _SEEN[key]


def folder_digest(path: Path) -> str:
    """One digest over a folder's files (a VAE folder: its config and weights), by relative name and contents."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}:{file_digest(file)}\n".encode())
    return digest.hexdigest()[:16]


def path_digest(value: object) -> str | None:
    """A recorded path's digest; None for what is no local file or folder (a Hub id, '<image>', a number)."""
    if not isinstance(value, str) or not os.path.isabs(value):
        return None
    read = _READ.get()
    if read is not None and os.path.abspath(value) in read:
        return read[os.path.abspath(value)]
    path = Path(value)
    try:
        if path.is_file():
            return file_digest(path)
        if path.is_dir():
            return folder_digest(path)
    except OSError:
        return None
    return None


def fingerprints(params: Mapping[str, object]) -> dict[str, str | list[str | None]]:
    """Digests of the local files and folders a result's parameters name (absolute paths, as results record them)."""
    found: dict[str, str | list[str | None]] = {}
    for key, value in params.items():
        if key in UNHASHED or key == KEY:
            continue
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            digests = [path_digest(v) for v in value]
            if any(digests):
                found[key] = digests
        elif (digest := path_digest(value)) is not None:
            found[key] = digest
    return found


def changed_inputs(params: Mapping[str, object]) -> list[str]:
    """The recorded inputs whose files now differ from what the result was made from, or are gone: one phrase each,
    naming the file."""
    recorded = params.get(KEY)
    if not isinstance(recorded, Mapping):
        return []
    changed = []
    for key, then in recorded.items():
        paths = params.get(key)
        pairs = zip(paths, then, strict=False) if isinstance(paths, list) and isinstance(then, list) \
            else [(paths, then)]
        for path, digest in pairs:
            if digest is None or not isinstance(path, str):
                continue
            if not os.path.exists(path):
                changed.append(f"{key} '{path}' is gone")
            elif path_digest(path) != digest:
                changed.append(f"{key} '{path}' has changed")
    return changed


def _places(path: str, beside: Path) -> list[Path]:
    """Where a gone input may be now, nearest first: by name beside the result and in its ``inputs/`` folder, then
    by its last two or three path parts in the result's folder and the three above it (a project moved whole:
    ``proj/img/c.jpg`` for a result in ``proj/out/``)."""
    parts = Path(path).parts
    tails = [Path(*parts[-n:]) for n in (1, 2, 3) if n < len(parts)]
    places = [beside / tails[0], beside / "inputs" / tails[0]]
    places += [folder / tail for folder in (beside, *list(beside.parents)[:3]) for tail in tails]
    return list(dict.fromkeys(places))


def relocated(params: Mapping[str, object], beside: Path) -> tuple[dict, list[str]]:
    """``params`` with each recorded input that is gone from its path replaced by a file of the same digest found
    near the result (``beside``: its folder; see :func:`_places`): beside it, in its ``inputs/`` folder, where the
    web UI keeps its copies, or where a project moved whole put it; and one phrase for each found. A results
    folder moved or shared with its inputs reruns from its records."""
    found = dict(params)
    recorded = params.get(KEY)
    if not isinstance(recorded, Mapping):
        return found, []
    said = []
    for key, then in recorded.items():
        value = params.get(key)
        paths, digests = (value, then) if isinstance(value, list) and isinstance(then, list) else ([value], [then])
        if len(paths) != len(digests):  # an edited record: left as it is
            continue
        now = []
        for path, digest in zip(paths, digests, strict=True):
            if isinstance(path, str) and digest and os.path.isabs(path) and not os.path.exists(path):
                for candidate in _places(path, beside):
                    if path_digest(absolute := str(candidate.resolve())) == digest:
                        said.append(f"{key} '{path}' is gone; the same file is at '{candidate}'")
                        path = absolute
                        break
            now.append(path)
        found[key] = now if isinstance(value, list) else now[0]
    return found, said
