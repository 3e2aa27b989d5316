"""Which Hub snapshot a model came from: a repository's files may change under its name, so a result records the
commit of the cached snapshot each Hub input was loaded from, and ``info`` says when the cache holds another now."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .loading import looks_like_hub_id

#: The file each kind of Hub input is found by in the cache: a pipeline's index, a single model's config.
INDEX_FILES = {"model": "model_index.json", "vae": "config.json", "controlnet": "config.json"}


def cached_snapshot(source: object, index: str) -> Path | None:
    """The folder of the snapshot of ``source`` (a Hub id) that the local Hugging Face cache loads now (its
    ``main``), found by its ``index`` file; None for local folders and files, and for a repository the cache does
    not hold."""
    if not isinstance(source, str) or not looks_like_hub_id(source) or Path(source).exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(source, index)
    except ValueError:  # an id huggingface_hub refuses (HFValidationError): not one it caches
        return None
    return Path(found).parent if isinstance(found, str) else None  # None: not cached, or cached as missing


def cached_commit(source: object, role: str = "model") -> str | None:
    """The commit of the snapshot of ``source`` (a Hub id) that the cache loads now (:func:`cached_snapshot`)."""
    snapshot = cached_snapshot(source, INDEX_FILES[role])
    return snapshot.name if snapshot is not None and snapshot.parent.name == "snapshots" else None


def hub_commits(sources: Mapping[str, object]) -> dict[str, str]:
    """``{role: commit}`` for the sources (``model``, ``vae``, ``controlnet``) that are cached Hub ids."""
    return {role: commit for role, source in sources.items() if role in INDEX_FILES
            and (commit := cached_commit(source, role))}


def changed_commits(params: Mapping[str, object]) -> list[str]:
    """The Hub inputs of a record whose cached snapshot is another than the one it was made from: one phrase
    each, naming the input and both commits."""
    made = params.get("made_with")
    recorded = made.get("hub_commits") if isinstance(made, Mapping) else None
    if not isinstance(recorded, Mapping):
        return []
    changed = []
    for role, then in recorded.items():
        now = cached_commit(params.get(role), role) if role in INDEX_FILES else None
        if now is not None and isinstance(then, str) and now != then:
            changed.append(f"{role} '{params[role]}' changed on the Hub (commit {then[:7]} then, {now[:7]} in "
                           "the cache now)")
    return changed
