"""Runs ``linfusion`` as a rank of a distributed command, with an injected failure on one rank.

``LINFUSION_TEST_FAIL_RANK`` names the rank whose UNet raises on its ``LINFUSION_TEST_FAIL_CALL``-th call
(1-based; 0: while loading, before any collective). Used by tests/parallel/test_launch.py only.
"""

import os
import sys

import torch

from linfusion.cli import main

torch.set_num_threads(1)

if int(os.environ["RANK"]) == int(os.environ.get("LINFUSION_TEST_FAIL_RANK", "-1")):
    from diffusers import UNet2DConditionModel

    fail_call = int(os.environ.get("LINFUSION_TEST_FAIL_CALL", "1"))
    if fail_call == 0:
        import linfusion.app.loading

        def broken_load(*args, **kwargs):
            raise RuntimeError("injected failure while loading")

        linfusion.app.loading.load_pipeline = broken_load
    else:
        import functools

        plain = UNet2DConditionModel.forward
        calls = []

        @functools.wraps(plain)
        def failing(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == fail_call:
                raise RuntimeError(f"injected failure in UNet call {fail_call}")
            return plain(self, *args, **kwargs)

        UNet2DConditionModel.forward = failing

sys.exit(main(sys.argv[1:]))
