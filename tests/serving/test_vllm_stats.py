"""A served engine's KV numbers (tca.serving.vllm.stats) without vLLM: the files the layer processes publish, the
sum the API server's collector exports at /metrics, the log line, and how often a process publishes.

The same numbers through `vllm serve` are checked in tests/serving/test_vllm_soak.py.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tca.serving.vllm import memory, stats

prometheus_client = pytest.importorskip("prometheus_client")


def usage(read: int, dense: int, decodes: int = 4) -> memory.KVUsage:
    return memory.KVUsage(pool_bytes=1000, state_bytes=10, prompts=2, chunks=1, decodes=decodes, mixed=0,
                          dense_bytes=dense, read_bytes=read)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv(stats.ENV, str(tmp_path / "stats"))  # made by the first publish
    monkeypatch.setattr(stats, "_last_logged", None)
    return tmp_path / "stats"


def test_publish_writes_this_process_totals_and_logs_changes_once(folder, caplog):
    with caplog.at_level(logging.INFO, logger="vllm.tca"):
        stats.publish(usage(read=300, dense=1200))
        stats.publish(usage(read=300, dense=1200))  # unchanged: no second line
    (path,) = folder.glob("process-*.json")
    assert json.loads(path.read_text())["read_bytes"] == 300
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.tca"]
    assert len(lines) == 1 and "(25%)" in lines[0] and "4 decodes" in lines[0]


def test_collector_sums_the_processes_and_skips_unreadable_files(folder):
    folder.mkdir()
    for pid, (read, dense) in {11: (300, 1200), 12: (100, 800)}.items():  # two tensor-parallel ranks
        totals = {name: getattr(usage(read, dense), name) for name in memory.KVUsage.__dataclass_fields__}
        (folder / f"process-{pid}.json").write_text(json.dumps(totals))
    (folder / "process-13.json").write_text("{half a fi")  # a process that exited mid-write
    registry = prometheus_client.CollectorRegistry()
    registry.register(stats.Collector(folder))
    text = prometheus_client.generate_latest(registry).decode()
    assert "tca:decode_kv_read_bytes_total 400.0" in text
    assert "tca:decode_kv_dense_bytes_total 2000.0" in text
    assert "tca:kv_pool_bytes 2000.0" in text
    assert "tca:decode_state_bytes 20.0" in text
    assert 'tca:rows_total{kind="decodes"} 8.0' in text


def test_collector_exports_nothing_before_a_tca_layer_publishes(tmp_path):
    registry = prometheus_client.CollectorRegistry()
    registry.register(stats.Collector(tmp_path / "never-made"))
    assert "tca:" not in prometheus_client.generate_latest(registry).decode()


def test_tick_publishes_at_most_every_interval(folder, monkeypatch):
    layer = memory.LayerUsage(pool_bytes=10)

    class Impl:  # what memory.kv_usage reads from a live layer implementation
        usage = layer

    impl = Impl()
    monkeypatch.setattr(memory, "LIVE_IMPLS", [impl])
    clock = iter([100.0, 101.0, 100.0 + stats.PUBLISH_SECONDS + 0.1])
    monkeypatch.setattr(stats.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(stats, "_next_publish", 0.0)

    def published() -> int:
        (path,) = folder.glob("process-*.json")
        return json.loads(path.read_text())["decodes"]

    layer.add("decodes", 100, torch.tensor([10, 20]), head_dim=4, element_size=2)
    stats.tick()
    layer.add("decodes", 101, torch.tensor([10, 20]), head_dim=4, element_size=2)
    stats.tick()  # within the interval: the file still says one
    assert published() == 1
    stats.tick()
    assert published() == 2


def test_prepare_names_a_folder_once_per_process_and_registers_the_collector(monkeypatch):
    monkeypatch.delenv(stats.ENV, raising=False)
    monkeypatch.setattr(stats, "_collector", None)
    registry = prometheus_client.CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", registry)
    stats.prepare()
    folder = stats.os.environ[stats.ENV]
    stats.prepare()  # vLLM loads plugins more than once per process: nothing new
    assert stats.os.environ[stats.ENV] == folder
    assert [c for c in registry._collector_to_names if isinstance(c, stats.Collector)] == [stats._collector]


def test_prepare_keeps_a_folder_the_environment_names(tmp_path, monkeypatch):
    monkeypatch.setenv(stats.ENV, str(tmp_path))  # named by the parent process (or the user)
    monkeypatch.setattr(stats, "_collector", None)
    monkeypatch.setattr(prometheus_client, "REGISTRY", prometheus_client.CollectorRegistry())
    stats.prepare()
    assert stats.os.environ[stats.ENV] == str(tmp_path) and stats._collector.folder == tmp_path


def test_kv_usage_adds_the_batched_steps_device_counters(monkeypatch):
    """The CUDA builders' decode counters (added on the device by the paged decode kernels) join the layers'."""
    layer = memory.LayerUsage(pool_bytes=10)
    layer.add("decodes", 100, torch.tensor([10, 20]), head_dim=4, element_size=2)

    class Holder:
        def __init__(self, usage):
            self.usage = usage

    step = Holder(memory.LayerUsage(state_bytes=64, paged=torch.tensor([3, 1000, 250])))
    monkeypatch.setattr(memory, "LIVE_IMPLS", [Holder(layer)])
    monkeypatch.setattr(memory, "LIVE_BUILDERS", [step])
    usage = memory.kv_usage()
    assert (usage.decodes, usage.dense_bytes, usage.read_bytes) == (1 + 3, 100 * 2 * 16 + 1000, 30 * 16 + 250)
    assert usage.pool_bytes == 10 and usage.state_bytes == 64
