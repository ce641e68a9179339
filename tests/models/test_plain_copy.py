"""tca.models.plain_copy: a model that carries GGUF quantization marks is saved as a plain folder that loads back
with the same weights."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tca.models.plain_copy import save_plain  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402


def test_marks_dropped_weights_kept(tmp_path):
    model = tiny_model("llama")
    model.hf_quantizer = object()  # what a GGUF load leaves: save_pretrained would refuse or serialise it
    model.config.quantization_config = {"quant_method": "gguf"}

    class Tokenizer:
        def save_pretrained(self, folder):
            (tmp_path / "tokenizer-saved").write_text(str(folder))

    folder = save_plain(model, Tokenizer(), tmp_path / "plain")
    again = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert not hasattr(again.config, "quantization_config")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    assert (tmp_path / "tokenizer-saved").read_text() == str(folder)
