"""Prometheus metrics of one server: requests, queue, running sequences, latencies, tokens, memory.

Each server has its own registry (no global state), served as text by /metrics."""
from __future__ import annotations

import psutil
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from memwise.serve.sequence import Sequence

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, device: torch.device):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("memwise_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.queue_length = Gauge("memwise_queue_length", "requests waiting for a slot", registry=r)
        self.running = Gauge("memwise_running_sequences", "sequences in the running batch", registry=r)
        self.ttft = Histogram("memwise_time_to_first_token_seconds", "arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("memwise_time_per_output_token_seconds", "mean time per token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("memwise_e2e_request_latency_seconds", "arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("memwise_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cancelled = Counter("memwise_cancelled_sequences", "sequences dropped because the client went away",
                                 registry=r)
        self.generation_tokens = Counter("memwise_generation_tokens", "tokens generated", registry=r)
        rss = Gauge("memwise_resident_memory_bytes", "resident memory of the server process", registry=r)
        process = psutil.Process()
        rss.set_function(lambda: process.memory_info().rss)
        if device.type == "cuda":
            gpu = Gauge("memwise_cuda_allocated_bytes", "CUDA memory allocated by torch", registry=r)
            gpu.set_function(lambda: torch.cuda.memory_allocated(device))

    def watch_blocks(self, engine) -> None:
        """Gauges of the engine's paged KV cache, when its batch keeps one."""
        if engine.kv_blocks is None:
            return
        free = Gauge("memwise_kv_free_blocks", "free blocks of the paged KV cache", registry=self.registry)
        free.set_function(lambda: engine.kv_blocks[0])
        used = Gauge("memwise_kv_used_blocks", "blocks of the paged KV cache held by sequences", registry=self.registry)
        used.set_function(lambda: engine.kv_blocks[1] - engine.kv_blocks[0])

    def finished(self, seq: Sequence) -> None:
        """Record a sequence that has left the batch."""
        self.prompt_tokens.inc(len(seq.prompt_ids))
        self.generation_tokens.inc(len(seq.generated))
        if seq.first_token_at is not None:
            self.ttft.observe(seq.first_token_at - seq.arrival)
            if seq.finished_at is not None:
                self.e2e.observe(seq.finished_at - seq.arrival)
                if len(seq.generated) > 1:
                    self.tpot.observe((seq.finished_at - seq.first_token_at) / (len(seq.generated) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
