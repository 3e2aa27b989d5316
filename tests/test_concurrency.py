"""One model, runs in several threads (a notebook's background jobs, a server's requests): each run puts its own
attention processors, padding and VAE on the model, so a second one waits for the first instead of taking them
for the model's own (both failed, and the model kept them)."""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

import attndistill as ad

FAST = dict(steps=3, size=64, progress=False)


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


class _Said(logging.Handler):
    def __init__(self, event: threading.Event) -> None:
        super().__init__(logging.INFO)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for another thread's run" in record.getMessage():
            self.event.set()


def test_a_run_on_a_model_another_thread_is_running_on_waits_and_both_give_their_own_results(tiny_sd15, data_dir):
    content, cat, wood = data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", data_dir / "wood-rings.jpg"
    alone = (ad.style_transfer(content, cat, model=tiny_sd15, **FAST),
             ad.texture_synthesis(wood, model=tiny_sd15, tile="xy", **FAST)[0])
    processors = dict(tiny_sd15.unet.attn_processors)
    first_runs, second_waits = threading.Event(), threading.Event()
    logger = logging.getLogger("attndistill")
    said, level = _Said(second_waits), logger.level
    logger.addHandler(said)
    logger.setLevel(logging.INFO)

    def hold_at_first_step(info):
        first_runs.set()
        second_waits.wait(timeout=30)  # the second run is at the door: this one goes on inside its model

    results, errors = {}, []

    def style():
        try:
            results["style"] = ad.style_transfer(content, cat, model=tiny_sd15, callback=hold_at_first_step, **FAST)
        except Exception as exc:  # noqa: BLE001 - said by the assertion below
            errors.append(exc)

    def texture():
        first_runs.wait(timeout=30)
        try:
            results["texture"] = ad.texture_synthesis(wood, model=tiny_sd15, tile="xy", **FAST)[0]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=style), threading.Thread(target=texture)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        logger.removeHandler(said)
        logger.setLevel(level)
    assert not errors and second_waits.is_set()
    assert np.array_equal(_pixels(results["style"]), _pixels(alone[0]))
    assert np.array_equal(_pixels(results["texture"]), _pixels(alone[1]))
    assert dict(tiny_sd15.unet.attn_processors) == processors
    assert all(m.padding_mode == "zeros" for m in tiny_sd15.unet.modules() if isinstance(m, torch.nn.Conv2d))
