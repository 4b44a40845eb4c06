"""A lane's batches (workers/batching.py ``DeviceLoop._next_batch``): while the model is busy a lane waits for a
full batch instead of taking the images ready so far; once the model is free it takes what is ready (on the
CPU, once the images still decoding had their time)."""

from __future__ import annotations

import os
import sys
import threading
from types import SimpleNamespace

import pytest

from salient_maps.storage.database import connect
from salient_maps.storage.settings import Settings
from salient_maps.workers.batching import DeviceLoop, Ticket
from salient_maps.workers.process import PendingItem


def loop_with(tmp_path, ready: int, decoding: int, linger: float | None = 0.0, device: str = "cpu"):
    settings = Settings().with_data_dir(tmp_path)
    loop = DeviceLoop(connect(settings.resolved_database_url), settings, 1, linger=linger, lanes=0)
    processor = SimpleNamespace(batch_size=4, explainer=SimpleNamespace(device=SimpleNamespace(type=device)))
    tickets = [Ticket(processor, PendingItem(i, "job", f"file:///{i}.png")) for i in range(ready + decoding)]
    loop._ready.extend(tickets[:ready])
    loop._decoding[id(processor)] = decoding
    return loop, tickets


def hand(loop: DeviceLoop, ticket: Ticket) -> None:
    with loop._cond:
        loop._decoding[id(ticket.processor)] -= 1
        loop._ready.append(ticket)
        loop._cond.notify_all()


def next_batch_in_thread(loop: DeviceLoop):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(loop._next_batch()), daemon=True)
    thread.start()
    return thread, out


def test_a_free_model_takes_the_ready_images_at_once(tmp_path):
    loop, tickets = loop_with(tmp_path, ready=2, decoding=2)
    assert loop._next_batch() == tickets[:2]


def test_while_the_model_is_busy_the_lane_waits_for_a_full_batch(tmp_path):
    loop, tickets = loop_with(tmp_path, ready=2, decoding=2)
    with loop.model_lock:
        thread, out = next_batch_in_thread(loop)
        thread.join(0.5)
        assert thread.is_alive() and not out  # linger is 0: without the busy model it had taken two
        for t in tickets[2:]:
            hand(loop, t)
        thread.join(30)
    assert out == [tickets]


def test_the_models_release_ends_the_wait_with_what_is_ready(tmp_path):
    loop, tickets = loop_with(tmp_path, ready=3, decoding=1)
    loop.model_lock.__enter__()
    thread, out = next_batch_in_thread(loop)
    thread.join(0.5)
    assert thread.is_alive() and not out
    loop.model_lock.__exit__(None, None, None)
    thread.join(30)
    assert out == [tickets[:3]]


def test_on_the_cpu_a_free_model_still_waits_for_the_images_decoding(tmp_path):
    """The decode threads share the CPU's cores with the model: waiting takes nothing from it, and a short batch
    pays a batch's fixed work for fewer images. A GPU waits only briefly (``LINGER``)."""
    gpu, gpu_tickets = loop_with(tmp_path / "gpu", ready=2, decoding=2, linger=None, device="cuda")
    thread, out = next_batch_in_thread(gpu)
    thread.join(30)
    assert out == [gpu_tickets[:2]]

    cpu, tickets = loop_with(tmp_path / "cpu", ready=2, decoding=2, linger=None)
    thread, out = next_batch_in_thread(cpu)
    thread.join(0.5)  # well past the GPU's linger, within the CPU's
    assert thread.is_alive() and not out
    for t in tickets[2:]:
        hand(cpu, t)
    thread.join(30)
    assert out == [tickets]


def test_every_lanes_model_calls_run_on_one_model_thread(tmp_path):
    """Each thread entering torch's OpenMP regions gets a thread team of its own; the lanes' calls must share one."""
    from salient_maps.workers.batching import ModelGuard

    loop, _ = loop_with(tmp_path, ready=0, decoding=0)
    seen: list[int] = []

    class Model:
        def explain(self, x):
            seen.append(threading.get_ident())
            if x < 0:
                raise ValueError("bad batch")
            return 2 * x

    model = ModelGuard(Model(), loop.model_lock, ("explain",))
    results, errors, lanes = [], [], []

    def lane(values):
        lanes.append(threading.get_ident())
        for v in values:
            try:
                results.append(model.explain(v))
            except ValueError as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=lane, args=(vs,)) for vs in ([1, 2, -1], [3, 4])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [2, 4, 6, 8] and errors == ["bad batch"]  # results and errors reach the caller
    assert len(seen) == 5 and len(set(seen)) == 1 and seen[0] not in lanes


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)  # on Linux the calling thread's own


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value is a thread's own on Linux only")
def test_the_host_threads_yield_the_cores_to_the_model_thread(tmp_path):
    """Reading and decoding (the pool) and storing (a lane) run at SALIENT_HOST_NICE; the model thread keeps the
    priority of the thread that built the loop, and the caller's is left alone."""
    from salient_maps.workers.process import Prepared

    base = own_nice()
    if base >= 19:
        pytest.skip("this process already runs at the lowest priority")
    settings = Settings(host_nice=max(base + 1, 11)).with_data_dir(tmp_path)
    loop = DeviceLoop(connect(settings.resolved_database_url), settings, 1, linger=0.0, lanes=1)
    seen: dict[str, int] = {}

    def read(item):
        seen["read"] = own_nice()
        return Prepared(item, data=b"bytes")

    def decode(p):
        seen["decode"] = own_nice()
        p.x = "pixels"

    def process_batch(batch):
        seen["lane"] = own_nice()
        with loop.model_lock:
            seen["model"] = loop.model_lock.run(own_nice)
        return ["done"] * len(batch)

    processor = SimpleNamespace(batch_size=2, read=read, decode=decode, skip_explained=lambda batch: None,
                                process_batch=process_batch, explainer=SimpleNamespace(device=SimpleNamespace(type="cpu")))
    tickets = [Ticket(processor, PendingItem(i, "job", f"file:///{i}.png")) for i in range(2)]
    caller = threading.Thread(target=loop.explain, args=(tickets,))
    caller.start()
    caller.join(60)
    assert not caller.is_alive() and all(t.ended.is_set() and t.error is None for t in tickets)
    assert seen == {"read": settings.host_nice, "decode": settings.host_nice, "lane": settings.host_nice,
                    "model": base}
    assert own_nice() == base  # the loop lowers only its own threads


@pytest.mark.parametrize("args, expected", [
    (["--torch-threads", "1"], 1),
    (["--torch-threads", "3", "--decode-threads", "2"], 2),
    ([], None),
])
def test_a_worker_given_n_torch_threads_reads_and_decodes_on_n(monkeypatch, args, expected):
    """Several workers sharing the cores each get --torch-threads; a decode pool larger than that share only
    contends for the GIL and the cores. None: one thread per core (``host_threads``)."""
    import torch
    from click.testing import CliRunner

    from salient_maps.workers import runtime, tasks
    from salient_maps.workers.celery_app import app
    from salient_maps.workers.worker_cli import worker

    argv: list = []
    monkeypatch.setattr(app, "worker_main", argv.append)
    # the command's process-wide settings, which must not reach the rest of the test session
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(tasks, "options", tasks.WorkerOptions())
    result = CliRunner().invoke(worker, ["--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    assert argv and tasks.options.decode_threads == expected
