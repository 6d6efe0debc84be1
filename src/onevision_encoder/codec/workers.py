"""Work beside the decoder: worker threads that put the sampled frames on the model's square and measure
their luma while decoding goes on, and torch kept to one thread for the small per-frame tensors."""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress

import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from .cells import SCALER_THREADS, _WorkMap, luma_cells

WORKER_NICENESS = 5  # added to the worker threads' nice value (`_start_worker`)


def _worker_pool(workers: int) -> ThreadPoolExecutor | None:
    """`workers` threads running torch on one thread each (torch's intra-op threads are per calling thread:
    more, and OpenMP teams oversubscribe the cores), a little below the calling thread's scheduling priority
    (`_start_worker`); None for none (`_submit` then runs jobs inline)."""
    return ThreadPoolExecutor(workers, initializer=_start_worker) if workers else None


def _start_worker() -> None:
    torch.set_num_threads(1)
    # A little below the decoding thread for the scheduler (Linux gives each thread its own nice value):
    # where threads outnumber free cores, the decoder, the selection's critical path, waits less for the
    # workers. On 2 cores, 640x360 H.264 went from 1.70x to 1.48x decode-only time; nice 19 starved the
    # workers beside HEVC's own decoding threads (1.69x -> 1.88x), nice 5 did not.
    if sys.platform.startswith("linux"):
        with suppress(OSError):
            thread = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, min(19, nice + WORKER_NICENESS))


def _submit(pool: ThreadPoolExecutor | None, fn, *args, **kwargs) -> Future:
    """`pool.submit(fn, ...)`, or with no pool, `fn(...)` run now in the calling thread: a Future either way."""
    if pool is not None:
        return pool.submit(fn, *args, **kwargs)
    done = Future()
    done.set_result(fn(*args, **kwargs))
    return done


class _SquareFrames:
    """Puts the sampled frames on the model's square (or, with `hold`, hands them to a `KeptPatchPainter`),
    and measures their luma (cells, or whole planes for "reference"), in worker threads while decoding goes
    on (`pool` also takes the motion sums, the block matching of codecs without motion vectors and the
    "reference" maps).

    The RGB conversion and the resize release the GIL and, on small videos, cost about as much as decoding
    every frame: done in turn with decoding they added their whole time to the selection; the luma cells,
    in the decoding thread, cost it 0.3 ms a frame at 640x360. At most `ahead` decoded frames wait, so
    memory stays bounded by the sampled frames (at the working resolution, or as held)."""

    def __init__(self, wmap: _WorkMap, num_frames: int, workers: int, ahead: int = 8, hold=None):
        self.wmap, self.ahead = wmap, ahead
        # uint8 until needed as floats: a quarter of the memory, and fresh float pages cost a page fault
        # each (about 20 ms for 64 frames of 224 px on the 2-core benchmark machine). A normal tensor even
        # under the caller's inference_mode, which worker threads do not inherit (they could not write it).
        # hold: instead of a picture, `hold(frame, slots)` keeps the frame (to paint its kept patches later).
        self.pictures, self.hold = None, hold
        if hold is None:
            with torch.inference_mode(False):
                self.pictures = torch.empty(num_frames, 3, wmap.plan.size, wmap.plan.size, dtype=torch.uint8)
        self.pool = _worker_pool(workers)
        # One FFmpeg scaler per kind and thread, reused for every frame: they are not thread-safe, and a
        # fresh scaler context per frame (what `frame.to_ndarray` makes) cost 4-10x the conversion itself.
        self.local = threading.local()
        self.pending: deque = deque()
        self.filled = np.zeros(num_frames, bool)

    def submit(self, fn, *args, **kwargs) -> Future:
        return _submit(self.pool, fn, *args, **kwargs)

    def put(self, frame, slots: list[int], cell: int | None = None, change: tuple | None = None) -> Future:
        """Put a sampled frame on its square (or hold it); with `cell`, also measure its luma cells (`luma_cells(frame,
        cell)`) in the same job, the Future's result (each hand-off costs the decoding thread tens of
        microseconds). change: (the Future of an earlier frame's luma cells, a `[work, work]` array): also
        write the luma change since that frame there, on the working grid."""
        job = self.submit(self._square, frame, slots, cell, change)
        self._wait_behind(slots, job)
        return job

    def plane(self, frame) -> Future:
        """The frame's full-resolution luma (uint8, 8-bit full range: FFmpeg's "gray"), to come. Its own
        scaler: one reused for another size would be set up again each time."""
        job = self.submit(lambda: self._scaler("plane").reformat(frame, format="gray",
                                                                  threads=SCALER_THREADS).to_ndarray())
        self._wait_behind([], job)
        return job

    def finish(self) -> np.ndarray | None:
        """Wait for every frame. A slot whose frame never came (the stream ended early, or the decoder dropped
        a broken frame) repeats the nearest earlier one (the first one, for leading slots). Returns, per slot,
        the slot whose frame it shows; None if no frame came at all."""
        while self.pending:
            self._finish_oldest()
        if not self.filled.any():
            return None
        slots = np.arange(len(self.filled))
        source = np.maximum.accumulate(np.where(self.filled, slots, -1))
        source[source < 0] = np.flatnonzero(self.filled)[0]
        if self.pictures is not None:
            for slot in np.flatnonzero(source != slots):
                self.pictures[slot] = self.pictures[source[slot]]
        return source

    def close(self) -> None:
        """Stop the workers, dropping frames not started (after an error)."""
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def _square(self, frame, slots: list[int], cell: int | None, change: tuple | None) -> np.ndarray | None:
        if self.hold is not None:
            self.hold(frame, slots)
        else:
            self.wmap.plan.place(self.wmap.picture(frame, self._scaler("rgb")), self.pictures[slots[0]])
        return None if cell is None else self._luma(frame, cell, change)

    def _luma(self, frame, cell: int, change: tuple | None) -> np.ndarray:
        luma = luma_cells(frame, cell, self._scaler("gray"))
        if change is not None:
            # The earlier frame's job came first off the queue: it is done or running, never waiting behind us.
            earlier, out = change
            out[...] = self.wmap(np.abs(luma - earlier.result()))
        return luma

    def _scaler(self, kind: str) -> VideoReformatter:
        if not hasattr(self.local, kind):
            setattr(self.local, kind, VideoReformatter())
        return getattr(self.local, kind)

    def _wait_behind(self, slots: list[int], job: Future) -> None:
        self.pending.append((slots, job))
        while len(self.pending) > self.ahead:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        slots, job = self.pending.popleft()
        job.result()
        if not slots:
            return
        for slot in slots[1:] if self.pictures is not None else ():  # a frame sampled for several slots
            self.pictures[slot] = self.pictures[slots[0]]
        self.filled[slots] = True


@contextmanager
def _torch_single_threaded():
    """Per-frame tensors are small: on 2 cores, OpenMP hand-offs made the per-frame tensor work 10-30x slower
    with 2 torch threads than with 1 (measured when frames were resized with torch), and the decoder wants
    the other core. The per-clip work (scores, choice, packing) is small too, and after each parallel region
    OpenMP's idle thread spins for a while (about 5 ms of a core per selection at 640x360, measured).
    Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
