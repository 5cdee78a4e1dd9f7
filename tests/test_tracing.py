"""Measuring on ``meta`` in one thread leaves the computations of every other thread alone."""

from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F

from linfusion.testing import tiny_unet
from linfusion.tracing import traced_peak


def test_tracing_in_one_thread_leaves_another_threads_attention_exact() -> None:
    """A web UI traces memory plans in a request thread while a generation runs in its worker thread."""
    real = tiny_unet("sd15")  # no LinFusion: every attention is a softmax one, through SDPA
    with torch.device("meta"):
        unet = type(real).from_config(real.config)
    latents = torch.empty(2, 4, 32, 32, device="meta")
    context = torch.empty(2, 77, real.config.cross_attention_dim, device="meta")
    timestep = torch.tensor(999, device="meta")
    query, key, value = (torch.randn(1, 2, 64, 16) for _ in range(3))
    expected = F.scaled_dot_product_attention(query, key, value)
    tracing = threading.Event()
    mismatches: list[int] = []
    calls = [0]

    def attend_while_tracing() -> None:
        tracing.wait()
        while tracing.is_set():
            result = F.scaled_dot_product_attention(query, key, value)
            calls[0] += 1
            if result.shape != expected.shape or not torch.equal(result, expected):
                mismatches.append(calls[0])
            time.sleep(0)  # let the tracing thread run too

    worker = threading.Thread(target=attend_while_tracing)
    worker.start()
    tracing.set()
    try:
        peaks = [
            traced_peak(lambda: unet(latents, timestep, encoder_hidden_states=context)) for _ in range(5)
        ]
    finally:
        tracing.clear()
        worker.join()
    assert min(peaks) > 0
    assert calls[0] > 0 and mismatches == []
