"""Reference and content features of upcoming steps, several steps per UNet call.

The reference (and content) latents a step scores against never depend on the
target: in optimisation mode they are the clean latents at the step's
timestep, in sampling they are the same latents noised for that step. One
batched UNet call with per-sample timesteps therefore computes their features
for the next few steps at once. On a GPU a batch of 8-16 costs little more
than a batch of one, so the per-step reference call all but disappears. On a
CPU a batch costs its size, so there it is off (``PerfOptions.lookahead_rows``).
The inputs of each step are made in step order, so noise drawn from a
generator comes out exactly as it would step by step. With
``PerfOptions.lookahead_overlap`` the next call runs on a second CUDA stream
while the current steps run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import is_out_of_memory
from .engine import Distiller, Reference
from .features import LayerFeatures
from .losses import concat_references

log = logging.getLogger(__name__)

#: One step's inputs: (timestep, reference latents, content latents or None).
StepInputs = tuple[int, torch.Tensor, torch.Tensor | None]


@dataclass
class Ahead:
    """What a step scores against, computed ahead: its inputs and their features."""

    t: int
    ref: torch.Tensor  # (R, 4, h, w), noised in sampling
    content: torch.Tensor | None  # (C, 4, h, w) or None
    features: tuple[Reference, list[torch.Tensor] | None]  # reference keys/values, content queries


def lookahead(distiller: Distiller, schedule: Sequence[int], inputs: Callable[[int], StepInputs],
              ref_latents: torch.Tensor, content_latents: torch.Tensor | None, *,
              auto: bool = True) -> ReferenceLookahead | None:
    """A :class:`ReferenceLookahead` sized by ``model.perf``, or None where each step is better alone.

    ref_latents / content_latents: the (un-noised) latents each step's inputs are made from; the
    content only where the content loss uses it. auto: see :meth:`PerfOptions.lookahead_rows`.
    """
    model = distiller.model
    latents = [x for x in (ref_latents, content_latents) if x is not None]
    rows = model.perf.lookahead_rows(model.device, max(x.shape[-2] * x.shape[-1] for x in latents),
                                     sum(x.shape[0] for x in latents), auto=auto)
    return ReferenceLookahead(distiller, schedule, inputs, rows) if rows else None


def _own(x: torch.Tensor) -> torch.Tensor:
    """``x`` in memory of its own (a view keeps its whole base alive)."""
    return x.clone(memory_format=torch.contiguous_format)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One second stream per device for the process: memory the caching allocator keeps for a stream
    is reused only by that stream, so a new stream per run would hold its own cache each time."""
    device = torch.device("cuda", torch.cuda.current_device()) if device.index is None else device
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class ReferenceLookahead:
    """``at(i)``: the :class:`Ahead` of step ``i``, computed with the next scheduled steps in one call.

    schedule: the step indices that need features, in order; inputs(i): that step's inputs (called
    once per step, in schedule order); batch: the most rows one UNet call may have (each step needs
    R reference + C content rows; a chunk has at least one step). pad: the last call of a run is
    filled up to the others' size with copies of its last step, whose features are dropped (default:
    on CUDA, where each new batch shape costs a one-time set-up, about 0.25 s on an H200 in run 5, and
    with ``compiled_calls``, where it costs a program).
    A run that fits in one call is filled up too: a few tens of ms of extra rows on a GPU, and runs
    of other lengths in the same process meet no new shape.
    """

    def __init__(self, distiller: Distiller, schedule: Sequence[int], inputs: Callable[[int], StepInputs],
                 batch: int, *, pad: bool | None = None, overlap: bool | None = None) -> None:
        self.distiller, self.schedule, self.inputs, self.batch = distiller, list(schedule), inputs, batch
        cuda = distiller.model.device.type == "cuda"
        # compiled feature calls: one shape a run, one program
        self.pad = (cuda or distiller.model.perf.compiled_calls) if pad is None else pad
        # overlap: the next call is made as soon as the current one is taken (on CUDA on a second
        # stream, running beside the current steps; elsewhere right away, which only reorders work)
        self.overlap = distiller.model.perf.lookahead_overlap if overlap is None else overlap
        self.side = side_stream(distiller.model.device) if self.overlap and cuda else None
        self.position = {step: k for k, step in enumerate(self.schedule)}
        self.ahead: dict[int, Ahead] = {}
        # the prefetched call: (its start, its steps, the event it ends with, the stream that uses it)
        self.next: tuple[int, dict[int, Ahead], torch.cuda.Event | None, torch.cuda.Stream | None] | None = None

    def at(self, step: int) -> Ahead:
        if step not in self.ahead:
            start = self.position[step]
            if self.next is not None and self.next[0] == start:
                _, self.ahead, done, main = self.next
                if done is not None:  # the stream that uses it (recorded in _prefetch) waits for the call
                    if torch.cuda.current_stream(self.side.device) != main:
                        raise RuntimeError("look-ahead features prefetched for another CUDA stream")
                    main.wait_event(done)
            else:
                self.ahead = {}  # the steps done: their features go before the next call needs memory
                self.ahead = self._compute(start)
            self.next = None
            following = start + len(self.ahead)
            if self.overlap and following < len(self.schedule):
                self.next = self._prefetch(following)
        return self.ahead[step]

    def _prefetch(self, start: int):
        """The call starting at schedule position ``start``, issued now (on the second stream on CUDA)."""
        if self.side is None:
            return start, self._compute(start), None, None
        main = torch.cuda.current_stream(self.side.device)
        self.side.wait_stream(main)  # the latents it reads were made on the main stream
        with torch.cuda.stream(self.side):
            chunk = self._compute(start)
            done = torch.cuda.Event()
            done.record(self.side)
        for ahead in chunk.values():  # made on the second stream, used on the main one: keep their memory
            reference, queries = ahead.features  # until the main stream's use of them is done
            for tensor in [ahead.ref, ahead.content, *reference.keys, *reference.values, *(queries or [])]:
                if tensor is not None:
                    tensor.record_stream(main)
        return start, chunk, done, main

    def _compute(self, start: int) -> dict[int, Ahead]:
        steps, inputs = [], []
        for step in self.schedule[start:]:
            t, ref, content = self.inputs(step)
            steps.append(step)
            inputs.append((t, ref, content))
            rows = ref.shape[0] + (content.shape[0] if content is not None else 0)
            if (len(steps) + 1) * rows > self.batch:
                break
        features = self._fitting(inputs, rows)
        return {step: Ahead(t, ref, content, feats)
                for step, (t, ref, content), feats in zip(steps, inputs, features, strict=True)}

    def _fitting(self, inputs: list[StepInputs], rows: int) -> list:
        """The features of ``inputs`` (steps of ``rows`` rows each), in calls of up to ``self.batch`` rows.

        A call that runs out of memory halves ``self.batch`` for the rest of the run and goes on from the
        step it failed at: the inputs are made once each (noise stays in order), and a step's features do
        not depend on the other rows of its call (on a GPU, up to rounding: kernels differ by batch).
        """
        per_call = max(1, self.batch // rows)
        features: list = []
        for i in range(0, len(inputs), per_call):
            part = inputs[i:i + per_call]
            # filler: copies of the last step, so that a run has one batch shape
            filler = [part[-1]] * (per_call - len(part)) if self.pad else []
            size = len(part) + len(filler)  # steps in the call
            try:
                with torch.no_grad():
                    features += self._features(part + filler, len(part))
                continue
            except Exception as exc:  # noqa: BLE001 - out of memory alone is retried, smaller
                if size == 1 or not is_out_of_memory(exc):
                    raise
            # out of the except block: its traceback would keep the failed call's memory
            self.batch = (size // 2) * rows
            log.warning("out of memory in a look-ahead call of %d rows; going on with %d rows a call "
                        "(--lookahead-batch sets it from the start)", size * rows, self.batch)
            return features + self._fitting(inputs[i:], rows)
        return features

    def _features(self, inputs: list[StepInputs], steps: int) -> list[tuple[Reference, list[torch.Tensor] | None]]:
        """Features of the first ``steps`` of ``inputs`` (the rest fill the call up and are dropped).

        Each layer keeps, as the call records it, copies of the rows each step uses (its reference
        rows' keys and values, its content rows' queries) and lets the rest go: the call's own
        queries, keys, values and outputs of every row (about 720 MiB for 16 rows of SD 1.5 at 512²) never
        pile up, and a step's copies do not keep the others alive.
        """
        r = inputs[0][1].shape[0]
        content = inputs[0][2]
        ts = [t for t, _, _ in inputs]
        # a compiled call keeps the filler's rows too: one program for every call of the run, the last included
        kept_steps = len(inputs) if self.distiller.model.perf.compiled_calls else steps
        if content is not None and content.shape[-2:] == inputs[0][1].shape[-2:]:
            per = r + content.shape[0]  # step-major rows [ref_0, content_0, ref_1, content_1, ...] in one call
            kept = self._call([torch.cat([ref, c.to(ref.dtype)]) for _, ref, c in inputs], ts,
                              keep=lambda f: [(_keys_values(f, j * per, r), _own(f.q[j * per + r:(j + 1) * per]))
                                              for j in range(kept_steps)])
            return [(_reference([layer[j][0] for layer in kept]), [layer[j][1] for layer in kept])
                    for j in range(steps)]
        kept = self._call([ref for _, ref, _ in inputs], ts,
                          keep=lambda f: [_keys_values(f, j * r, r) for j in range(kept_steps)])
        queries: list[list[torch.Tensor] | None] = [None] * steps
        if content is not None:
            c = content.shape[0]
            by_layer = self._call([c_ for _, _, c_ in inputs], ts,
                                  keep=lambda f: [_own(f.q[j * c:(j + 1) * c]) for j in range(kept_steps)])
            queries = [[layer[j] for layer in by_layer] for j in range(steps)]
        return [(_reference([layer[j] for layer in kept]), queries[j]) for j in range(steps)]

    def _call(self, latents: list[torch.Tensor], ts: list[int], *, keep) -> list:
        """What ``keep`` makes of each layer's features of the concatenated ``latents``, each block at
        its own timestep."""
        device = latents[0].device
        t = torch.cat([torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
                       for x, t in zip(latents, ts, strict=True)])
        return self.distiller.features(torch.cat(latents), t, keep=keep)


def _keys_values(f: LayerFeatures, start: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Own copies of the keys and values of reference rows ``start:start+rows``, references concatenated."""
    return (_own(concat_references(f.k[start:start + rows])), _own(concat_references(f.v[start:start + rows])))


def _reference(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Reference:
    return Reference([k for k, _ in layers], [v for _, v in layers])
