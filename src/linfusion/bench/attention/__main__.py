"""The CPU memory worker: ``python -m linfusion.bench.attention --memory-worker`` reads cases as JSON on stdin
and prints their peaks (a fresh process: RSS depends on the heap's history)."""

from __future__ import annotations

import json
import sys

from .memory import memory_worker

if sys.argv[1:2] == ["--memory-worker"]:
    payload = json.loads(sys.stdin.read())
    print(json.dumps(memory_worker(payload["cases"], payload["device"], payload.get("threads"))))
