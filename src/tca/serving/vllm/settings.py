"""The plugin's settings, read from environment variables (so every vLLM process sees the same ones).

TCA_VLLM_PLAN        a tca budget plan JSON file (`python -m tca calibrate`), or "default" (docs/semantics.md
                     section 1's default budgets, the default) or "dense" (nothing dropped: vLLM's own result).
TCA_VLLM_BLOCK_SIZE  TCA block size b for "default"/"dense" (a plan brings its own); default 128.
TCA_VLLM_WINDOW      local window w in tokens; overrides a plan's; default 4096 (or the plan's).
TCA_VLLM_BACKEND     which tca backend computes selection and prefill attention ("auto", "torch", "triton",
                     "flash", "reference"); default "auto".
TCA_VLLM_DENSE_BELOW sequences shorter than this many tokens run vLLM's own dense attention; default: the
                     measured crossover of the device and attention shape (tca.backends.crossover), and never
                     below the window (under it TCA is dense attention anyway). 0 runs TCA on every sequence.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...budgets import default_budgets, dense_budgets
from ...config import TCAConfig
from ...plan import BudgetPlan

PLAN_VARIABLE = "TCA_VLLM_PLAN"
BLOCK_SIZE_VARIABLE = "TCA_VLLM_BLOCK_SIZE"
WINDOW_VARIABLE = "TCA_VLLM_WINDOW"
BACKEND_VARIABLE = "TCA_VLLM_BACKEND"
DENSE_BELOW_VARIABLE = "TCA_VLLM_DENSE_BELOW"
UNIFORM = ("default", "dense")


def _int_variable(environ, name: str) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of tokens, got {text!r}") from None


def _config(given: dict) -> TCAConfig:
    """TCAConfig of the given fields (None: the default), its error naming the variables that set them."""
    try:
        return TCAConfig(**{name: value for name, value in given.items() if value is not None})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{BLOCK_SIZE_VARIABLE} / {WINDOW_VARIABLE} (or the plan's): {error}") from None


@dataclass(frozen=True)
class Settings:
    """Budgets for every layer: a plan, or one uniform budget configuration p [len(K)]."""

    config: TCAConfig
    backend: str
    plan: BudgetPlan | None
    uniform: torch.Tensor | None
    source: str
    dense_below_tokens: int | None = None  # TCA_VLLM_DENSE_BELOW, when given

    @classmethod
    def from_environment(cls, environ=None) -> Settings:
        environ = os.environ if environ is None else environ
        source = environ.get(PLAN_VARIABLE) or "default"
        block_size = _int_variable(environ, BLOCK_SIZE_VARIABLE)
        window = _int_variable(environ, WINDOW_VARIABLE)
        backend = environ.get(BACKEND_VARIABLE) or "auto"
        from ...backends import registry

        if backend != "auto" and backend not in registry.names():
            raise ValueError(f"{BACKEND_VARIABLE}={backend!r} is not a tca backend: use auto or one of {registry.names()}")
        dense_below = _int_variable(environ, DENSE_BELOW_VARIABLE)
        if dense_below is not None and dense_below < 0:
            raise ValueError(f"{DENSE_BELOW_VARIABLE} must be 0 or more tokens, got {dense_below}")
        if source in UNIFORM:
            given = {"block_size": block_size, "window": window}
            config = _config(given)
            p = default_budgets(config.block_size) if source == "default" else dense_budgets(config.block_size)
            return cls(config, backend, None, p, source, dense_below)
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"{PLAN_VARIABLE}={source!r}: no such plan file; give a tca budget plan JSON (made by "
                f"`python -m tca calibrate`), or one of {UNIFORM}"
            )
        plan = BudgetPlan.load(path)
        if block_size is not None and block_size != plan.config.block_size:
            raise ValueError(
                f"{BLOCK_SIZE_VARIABLE}={block_size} differs from the plan's block size {plan.config.block_size}; "
                f"unset {BLOCK_SIZE_VARIABLE} (budgets are distributions over 1, 2, ..., b of the plan)"
            )
        config = plan.config if window is None else _config({**plan.config.to_dict(), "window": window})
        return cls(config, backend, plan, None, str(path), dense_below)

    def dense_below(self, device: torch.device, shape: tuple[int, int, int]) -> int:
        """Sequences shorter than this run dense: TCA_VLLM_DENSE_BELOW, else the crossover of `device` for attention
        of `shape` (query heads, KV heads, head dim per rank), at least the window."""
        if self.dense_below_tokens is not None:
            return self.dense_below_tokens
        from ...backends.crossover import crossover

        return max(self.config.window, crossover(device, shape).dense_below)

    def describe(self, dense_below: int) -> str:
        """One line for the engine's start-up log: the TCA settings in effect."""
        return (
            f"TCA attention: budgets {self.source!r}, block size {self.config.block_size}, window {self.config.window}, "
            f"tca backend {self.backend!r}; sequences under {dense_below} tokens run dense ({DENSE_BELOW_VARIABLE})"
        )

    def check_model(self, num_layers: int, num_kv_heads: int, world_size: int, device, dtype, head_size: int) -> None:
        """Refuse, before the model loads, a plan made for another model or a tca backend that cannot run here."""
        if self.plan is not None and (self.plan.num_layers, self.plan.num_kv_heads) != (num_layers, num_kv_heads * world_size):
            raise ValueError(
                f"{PLAN_VARIABLE}={self.source!r} is a plan for {self.plan.num_layers} layers of "
                f"{self.plan.num_kv_heads} KV heads, but the model has {num_layers} layers of "
                f"{num_kv_heads * world_size} KV heads; calibrate a plan for this model (`python -m tca calibrate`)"
            )
        from ...backends import routing

        try:
            routing.resolve(self.backend, device, dtype, head_size)
        except (RuntimeError, ValueError, TypeError) as error:
            raise ValueError(f"{BACKEND_VARIABLE}={self.backend!r} cannot run here: {error}") from None

    def layer_budgets(self, layer: int, num_kv_heads: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """[HKV, len(K)] float64 budgets of `layer` for the HKV heads this tensor-parallel rank holds."""
        if self.plan is None:
            return self.uniform.expand(num_kv_heads, -1).contiguous()
        if not 0 <= layer < self.plan.num_layers:
            raise ValueError(
                f"the budget plan {self.source!r} has {self.plan.num_layers} layers, but vLLM asks for layer {layer}; "
                "calibrate a plan for this model"
            )
        if self.plan.num_kv_heads != num_kv_heads * world_size:
            raise ValueError(
                f"the budget plan {self.source!r} has {self.plan.num_kv_heads} KV heads per layer, but the model has "
                f"{num_kv_heads} per rank on {world_size} tensor-parallel rank(s) ({num_kv_heads * world_size} in all); "
                "calibrate a plan for this model (KV heads replicated across ranks are not supported)"
            )
        return self.plan.budgets(layer)[rank * num_kv_heads : (rank + 1) * num_kv_heads].contiguous()


def engine_dense_below(vllm_config, device: torch.device | None = None) -> int:
    """Sequences shorter than this run dense in this engine (Settings.dense_below for the shape one rank holds).
    device: None for the current CUDA device."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    shape = (model.get_num_attention_heads(parallel), model.get_num_kv_heads(parallel), model.get_head_size())
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    return Settings.from_environment().dense_below(device, shape)


def layer_index(layer_name: str) -> int:
    """The layer number in a vLLM layer name such as "model.layers.3.self_attn.attn"."""
    numbers = re.findall(r"\.(\d+)\.", f".{layer_name}.")
    if len(numbers) != 1:
        raise ValueError(f"cannot tell the layer number of attention layer {layer_name!r} (expected one '.N.' in it)")
    return int(numbers[0])
