"""An embedded model's first uses at once (two sweeps on a machine, the test session's background pretraining and a
test) pretrain it once: the others wait on its lock, say so, then read the same file."""

from __future__ import annotations

import threading
import time

import torch

from trainables.models import tiny_clip


def test_concurrent_first_uses_pretrain_once_and_the_one_that_waits_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAVA_CACHE_DIR", str(tmp_path))
    pretraining, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_pretrain(config, progress):
        calls.append(threading.current_thread().name)
        pretraining.set()
        assert release.wait(30)
        return {"w": torch.arange(3.0)}

    monkeypatch.setattr(tiny_clip, "pretrain", slow_pretrain)
    paths: dict[str, object] = {}

    def first_use(name: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: paths.__setitem__(name, tiny_clip.ensure_pretrained(progress=False)), name=name)
        thread.start()
        return thread

    first = first_use("first")
    assert pretraining.wait(30)
    second = first_use("second")
    deadline = time.monotonic() + 30
    while "waiting for another process that is pretraining tiny-clip" not in capsys.readouterr().err:
        assert time.monotonic() < deadline, "the second first use neither waited nor said so"
        time.sleep(0.05)
    assert second.is_alive()  # it waits for the first instead of pretraining its own copy
    release.set()
    first.join(30)
    second.join(30)
    assert calls == ["first"]
    assert paths["first"] == paths["second"] == tiny_clip.cached_weights_path()
    assert torch.equal(tiny_clip.read_state_dict(paths["second"])["w"], torch.arange(3.0))
