"""`diffsr upscale` reads the next images and writes finished ones on background threads while the model
works (with --batch-size N: the whole next batch), and does all I/O on the main thread with
--no-io-overlap. A stand-in model records, while it runs, which reads have started."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

import diffsr.api
import diffsr.io
from diffsr.cli import main
from diffsr.io import ImageData

WAIT = 5.0  # s a stand-in call waits for a read it expects to run beside it (never reached when it does)


class _Recorder:
    """Wraps diffsr.io's read/write, and stands in for the model: each call notes which of the reads
    that should overlap it have started (waiting up to `wait` seconds for them)."""

    def __init__(self, names: list[str], ahead: int, wait: float):
        self.names, self.ahead, self.wait = names, ahead, wait
        self.started = {n: threading.Event() for n in names}
        self.threads: dict[str, set[str]] = {"read": set(), "write": set()}
        self.calls: list[tuple[list[str], list[bool]]] = []  # (the images of a call, reads seen beside it)
        self.batchable = True

    def wrap(self, kind: str, fn):
        def wrapped(path, *a, **k):
            self.threads[kind].add(threading.current_thread().name)
            if kind == "read":
                self.started[path.name].set()
            return fn(path, *a, **k)

        return wrapped

    def _run(self, images: list[ImageData]) -> list[tuple[ImageData, dict]]:
        shown = [self._name(im) for im in images]
        last = self.names.index(shown[-1])
        expected = self.names[last + 1 : last + 1 + self.ahead]
        seen = [self.started[n].wait(self.wait) for n in expected]
        self.calls.append((shown, seen))
        return [(ImageData(np.repeat(np.repeat(im.pixels, 2, 0), 2, 1), None, 8), {}) for im in images]

    def _name(self, im: ImageData) -> str:
        return self.names[round(float(im.pixels[0, 0, 0]) * 255)]  # each input's first pixel is its index

    def process(self, image, **_):
        return self._run([image])[0]

    def process_batch(self, images, batch_size=None, **_):
        return self._run(images)


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    names = [f"{i:02d}.png" for i in range(7)]
    for i, n in enumerate(names):
        a = np.full((6, 5, 3), 40, np.uint8)
        a[0, 0, 0] = i
        Image.fromarray(a).save(src / n)
    return src, names


def _run(monkeypatch, folder, tmp_path, flags, ahead, wait=WAIT):
    src, names = folder
    rec = _Recorder(names, ahead, wait)
    monkeypatch.setattr(diffsr.io, "read_image", rec.wrap("read", diffsr.io.read_image))
    monkeypatch.setattr(diffsr.io, "write_image", rec.wrap("write", diffsr.io.write_image))
    monkeypatch.setattr(diffsr.api, "load", lambda *a, **k: rec)
    assert main(["upscale", str(src), "-o", str(tmp_path / "out"), "-q", *flags]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    return rec


@pytest.mark.parametrize("n", [1, 3])
def test_next_images_are_read_while_the_model_works(monkeypatch, folder, tmp_path, n):
    flags = ["--batch-size", str(n)] if n > 1 else []
    rec = _run(monkeypatch, folder, tmp_path, flags, ahead=n)
    assert [c[0] for c in rec.calls] == (
        [[x] for x in folder[1]] if n == 1 else [folder[1][:3], folder[1][3:6], folder[1][6:]]
    )
    assert all(all(seen) for _, seen in rec.calls)  # every read of the next call's images ran beside this one
    assert rec.threads == {"read": {"diffsr-read_0"}, "write": {"diffsr-write_0"}}


def test_no_io_overlap_reads_and_writes_on_the_main_thread(monkeypatch, folder, tmp_path):
    rec = _run(monkeypatch, folder, tmp_path, ["--no-io-overlap"], ahead=1, wait=0.05)
    assert rec.threads == {"read": {"MainThread"}, "write": {"MainThread"}}
    assert not any(any(seen) for _, seen in rec.calls)  # nothing is read before the model is done


def test_results_waiting_for_a_slow_disk_stay_bounded(monkeypatch, folder, tmp_path):
    """The model is far faster than the disk here: it waits for the writer rather than piling up results."""
    src, names = folder
    rec = _Recorder(names, ahead=0, wait=0)
    written, backlog = [], []
    write = diffsr.io.write_image

    def slow_write(*a, **k):
        time.sleep(0.05)
        write(*a, **k)
        written.append(1)

    def model(images):
        backlog.append(sum(len(c[0]) for c in rec.calls) - len(written))  # results not yet on disk
        return _Recorder._run(rec, images)

    monkeypatch.setattr(diffsr.io, "write_image", slow_write)
    monkeypatch.setattr(diffsr.api, "load", lambda *a, **k: rec)
    monkeypatch.setattr(rec, "_run", model)
    assert main(["upscale", str(src), "-o", str(tmp_path / "out"), "-q", "--batch-size", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    assert max(backlog) <= 4 and len(backlog) == 4  # 2 × the batch size
