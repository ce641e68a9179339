"""KV numbers of a served engine, where its operators look: `/metrics` and the log.

The counters (memory.py) live in the processes that run the layers (vLLM's engine core or its workers), while
`vllm serve` answers `/metrics` from the API server process. So every few seconds, while it runs steps, a process
with TCA layers writes its totals to a small JSON file in one folder and logs one line. The folder
(`TCA_VLLM_STATS_DIR`) is named by the first process that loads the plugin and inherited by the processes it
starts; that first process registers a Prometheus collector that sums those files whenever `/metrics` is read:

    tca:decode_kv_read_bytes_total    KV bytes TCA's decode steps read (kept tokens plus window)
    tca:decode_kv_dense_bytes_total   KV bytes a dense backend would have read over the same steps
    tca:kv_pool_bytes                 vLLM's KV pool of the TCA layers (allocated up front: every token)
    tca:decode_state_bytes            the CUDA backend's decode-state pools beside it (allocated up front)
    tca:rows_total{kind=...}          prompt, chunk and decode rows run by TCA layers (summed over layers)

The files lag the engine by at most PUBLISH_SECONDS while it runs. A process with no TCA layer writes nothing,
and the collector then yields no samples, so an engine that does not use TCA exports nothing new.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ENV = "TCA_VLLM_STATS_DIR"
PUBLISH_SECONDS = 5.0

_next_publish = 0.0
_last_logged: tuple | None = None
_collector = None


def prepare() -> None:
    """Once per process: unless the environment names the folder already (a process started by one that did, or
    the user), name one (made by the first process that publishes, removed when this one exits); and put the
    collector on prometheus_client's default registry, which `vllm serve` exposes at /metrics from the API server
    process (the first to load the plugin). An engine without TCA layers never makes the folder."""
    global _collector
    if _collector is not None:
        return
    folder = os.environ.get(ENV)
    if not folder:
        folder = str(Path(tempfile.gettempdir()) / f"tca-vllm-stats-{os.getpid()}")
        os.environ[ENV] = folder  # inherited by the engine core and worker processes started after this
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    _collector = Collector(Path(folder))
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # vLLM depends on it; without it the log lines remain
        return
    REGISTRY.register(_collector)


def tick() -> None:
    """Called after each TCA layer forward: write this process's totals and log them, at most every
    PUBLISH_SECONDS (and never while a CUDA graph is being captured: reading the device counter waits for it)."""
    global _next_publish
    now = time.monotonic()
    if now < _next_publish:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    _next_publish = now + PUBLISH_SECONDS
    from .memory import kv_usage

    publish(kv_usage())


def publish(usage) -> None:
    """Write `usage` (memory.KVUsage) to this process's file in the folder, and log it if it changed."""
    global _last_logged
    totals = {name: getattr(usage, name) for name in usage.__dataclass_fields__}
    folder = os.environ.get(ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / f"process-{os.getpid()}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(totals))
        temporary.replace(path)  # atomic: a scrape never reads half a file
    key = tuple(totals.values())
    if key != _last_logged:
        _last_logged = key
        logging.getLogger("vllm.tca").info(
            "TCA KV: decode steps read %s, dense attention would read %s (%.0f%%); rows run: %d prompts, %d chunks, "
            "%d decodes (summed over layers); KV pool %s (vLLM's: every token), decode states %s",
            size(usage.read_bytes), size(usage.dense_bytes), 100 * usage.read_fraction, usage.prompts, usage.chunks,
            usage.decodes, size(usage.pool_bytes), size(usage.state_bytes),
        )


def size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def read_totals(folder: Path) -> dict[str, int] | None:
    """The published totals summed over processes (tensor-parallel ranks, engines), or None if none published."""
    totals = None
    for path in sorted(folder.glob("process-*.json")) if folder.is_dir() else []:
        try:
            one = json.loads(path.read_text())
        except (OSError, ValueError):  # a process that exited while the folder was read
            continue
        totals = one if totals is None else {name: totals[name] + one.get(name, 0) for name in totals}
    return totals


class Collector:
    """prometheus_client collector over the published files (read at each scrape)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals = read_totals(self.folder)
        if totals is None:
            return
        yield CounterMetricFamily("tca:decode_kv_read_bytes", "KV bytes read by TCA decode steps",
                                  value=totals["read_bytes"])
        yield CounterMetricFamily("tca:decode_kv_dense_bytes",
                                  "KV bytes a dense backend would have read over the same decode steps",
                                  value=totals["dense_bytes"])
        yield GaugeMetricFamily("tca:kv_pool_bytes", "vLLM's KV pool of the TCA layers (every token)",
                                value=totals["pool_bytes"])
        yield GaugeMetricFamily("tca:decode_state_bytes",
                                "decode-state pools of the TCA layers beside vLLM's KV pool (CUDA)",
                                value=totals.get("state_bytes", 0))
        rows = CounterMetricFamily("tca:rows", "rows run by TCA layers, summed over layers", labels=["kind"])
        for kind in ("prompts", "chunks", "decodes"):
            rows.add_metric([kind], totals[kind])
        yield rows
