"""``salient worker`` with poison images, for tests/pipeline/test_poison.py. The faults are injected here,
from outside, so the production code carries no test hooks:

- an image whose sha256 is in POISON_CRASH_SHA256 ends the process the moment the model gets it, as a
  segfault in a kernel or the out-of-memory killer would;
- one whose sha256 is in POISON_HANG_SHA256 makes the model call never return.

Usage: python faulty_worker.py worker [salient worker options]
"""

from __future__ import annotations

import os
import sys
import threading

from salient_maps.producer.cli import main
from salient_maps.workers.batching import ModelLock
from salient_maps.workers.process import ItemProcessor

CRASH = set(filter(None, os.environ.get("POISON_CRASH_SHA256", "").split(",")))
HANG = set(filter(None, os.environ.get("POISON_HANG_SHA256", "").split(",")))
_poisoned = threading.local()  # what the batch this lane is explaining holds
_process_batch, _run = ItemProcessor.process_batch, ModelLock.run


def process_batch(self, batch):
    shas = {p.sha256 for p in batch if p.error is None}
    _poisoned.crash, _poisoned.hang = bool(shas & CRASH), bool(shas & HANG)
    try:
        return _process_batch(self, batch)
    finally:
        _poisoned.crash = _poisoned.hang = False


def run(self, call, *args, **kwargs):
    # Model calls run on the lock's model thread: the lane's batch decides, the model thread crashes or hangs.
    crash, hang = getattr(_poisoned, "crash", False), getattr(_poisoned, "hang", False)

    def poisoned(*a, **k):
        if crash:
            print(f"faulty_worker: crashing on a poison image (pid {os.getpid()})", flush=True)
            os._exit(139)
        if hang:
            print(f"faulty_worker: hanging on a poison image (pid {os.getpid()})", flush=True)
            threading.Event().wait()
        return call(*a, **k)

    return _run(self, poisoned, *args, **kwargs)


ItemProcessor.process_batch = process_batch
ModelLock.run = run

if __name__ == "__main__":
    sys.exit(main())
