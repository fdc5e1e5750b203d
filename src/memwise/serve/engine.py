"""The engine: one thread owns the model and runs the batch step by step; requests wait in a bounded
queue and join the batch at the next step when a slot is free (iteration-level batching). Each step
decodes one token of every running sequence and feeds newcomers' prompts in chunks within a token
budget (serve.batch)."""
from __future__ import annotations

import logging
import queue
import threading

import torch

from memwise.errors import MemwiseError

from memwise.language_model import LanguageModel
from memwise.serve.batch import running_batch
from memwise.serve.metrics import ServeMetrics
from memwise.serve.protocol import ApiError
from memwise.serve.sequence import Sequence

log = logging.getLogger("memwise.serve")

# How long the idle loop waits for a request before it looks at the stop flag again.
_IDLE_WAIT_S = 0.05


class Engine:
    def __init__(self, model: LanguageModel, max_batch: int, max_queue: int, metrics: ServeMetrics,
                 step_tokens: int | None = None):
        self.model = model
        self.batch = running_batch(model, max_batch, step_tokens)
        self.metrics = metrics
        self.waiting: queue.Queue[Sequence] = queue.Queue(max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def free_slots(self) -> int:
        return self.batch.free_slots

    @property
    def capacity(self) -> int:
        return self.batch.capacity

    @property
    def kv_blocks(self) -> tuple[int, int] | None:
        """(free, usable) blocks of the paged KV cache; None for a batch without one."""
        pool = getattr(self.batch, "pool", None)
        return None if pool is None else (pool.free_blocks, pool.usable_blocks)

    @property
    def running(self) -> int:
        return len(self.batch.running)

    @property
    def queued(self) -> int:
        return self.waiting.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memwise-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; running and waiting sequences end with finish_reason "abort"."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; 429 with Retry-After when the queue is full, 503 when the engine is down."""
        if self._stop.is_set() or self.error is not None:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        try:
            self.waiting.put_nowait(seq)
        except queue.Full:
            raise ApiError(429, f"the server is busy: {self.waiting.maxsize} request(s) already wait for a slot",
                           kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        self.metrics.queue_length.set(self.waiting.qsize())

    def _run(self) -> None:
        # Inference mode for the whole loop: each interleaved generator enters and leaves it itself,
        # and a generator that finishes restores the mode it found, which must stay on for the others.
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as e:
            log.exception("the engine stopped")    # the server must answer, not hang: every waiter is told
            self.error = e
        finally:
            for seq in list(self.batch.running):
                seq.end("abort")
                self.batch.remove(seq)
            while not self.waiting.empty():
                self.waiting.get_nowait().end("abort")
            self._count()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._admit()
            self._leave_cancelled()
            running = list(self.batch.running)
            self.batch.step()
            for seq in running:
                if seq.done:
                    self.metrics.finished(seq)
            self._count()

    def _admit(self) -> None:
        """Move waiting sequences into free slots (their prompts are fed by the steps); wait a little when idle."""
        while self.batch.free_slots > 0:
            try:
                block = not self.batch.running
                seq = self.waiting.get(timeout=_IDLE_WAIT_S) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            self.metrics.queue_length.set(self.waiting.qsize())
            if seq.cancelled:
                continue
            try:
                self.batch.add(seq)
            except MemwiseError as e:    # e.g. the memory gate refused this one's cache: it alone fails
                self.batch.remove(seq)
                seq.end("error", str(e))
                self.metrics.finished(seq)

    def _leave_cancelled(self) -> None:
        for seq in list(self.batch.running):
            if seq.cancelled:
                self.batch.remove(seq)
                self.metrics.cancelled.inc()
                self.metrics.finished(seq)

    def _count(self) -> None:
        self.metrics.running.set(len(self.batch.running))
        self.metrics.queue_length.set(self.waiting.qsize())
