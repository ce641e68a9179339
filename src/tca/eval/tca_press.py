"""TCA as a kvpress press (kvpress 0.5.5): `TCAPress`, so that kvpress users compare TCA on their benchmarks.

    from tca.eval.tca_press import TCAPress          # imports kvpress (ImportError saying how to install it)
    press = TCAPress()                               # default budgets, b = 128, w = 4096 (docs/kvpress.md)
    with press(model):
        model(input_ids=ids, past_key_values=cache)  # the prefill: the cache is compressed, layer by layer

At the end of the prefill of each attention layer the press keeps, per KV head, what TCA's compressed cache
holds after a prefill (docs/semantics.md section 5): the global tokens selected from the prompt's last query
(sections 3.1-3.4, the production selection of a tca backend) and that query's window [J b, L). Heads keep
different counts: the cache is cut to the largest count and the spare slots are masked (kvpress's
`masked_key_indices`, as AdaKV), so the decoding that follows attends over exactly those tokens.

What it does not reproduce (a press acts once, after the prefill):
- decode-time compression: TCA's cache compresses each block that leaves the window while decoding (section 5,
  step 2); the press keeps every token generated after the prefill, so a long generation holds more than TCA's
  cache would;
- TCA's sparse prefill: the prefill runs the model's own dense attention (as under every press); TCA native
  attends sparsely during the prefill too (section 4), so from the second layer on its keys, and therefore its
  selections, can differ once the prompt is longer than the window.

TCAPress is built on first access (a module `__getattr__`): kvpress is imported only when asked for.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..budgets import dense_budgets
from ..config import TCAConfig
from ..plan import BudgetPlan
from ..validation import check_budgets, check_scale
from .kept_positions import gather_kept, post_prefill_positions
from .presses import hook_kwargs, import_kvpress

BUDGET_NAMES = ("default", "dense")


def __getattr__(name: str):
    if name == "TCAPress":
        cls = _press_class()
        globals()["TCAPress"] = cls  # built once
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class PressSettings:
    """The checked options: the config, and either a plan (budgets per layer) or one budget tensor for all."""

    config: TCAConfig
    plan: BudgetPlan | None
    budgets: torch.Tensor | None  # [K] or [HKV, K] for every layer; None with a plan or for default budgets

    def layer_budgets(self, layer: int) -> torch.Tensor | None:
        """Layer `layer`'s budgets as given (None: default budgets; checked later by check_budgets)."""
        return self.plan.budgets(layer) if self.plan is not None else self.budgets


def press_settings(budgets, block_size, window, config, backend) -> PressSettings:
    """Check TCAPress's options and resolve them (the docstring of TCAPress says what each takes)."""
    if config is not None and not isinstance(config, TCAConfig):
        raise TypeError(f"config must be a tca.TCAConfig or None, got {type(config).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string (a tca backend name or 'auto'), got {type(backend).__name__}")
    if backend != "auto":
        from ..backends import registry

        registry.get(backend)  # an unknown name fails here, listing the known ones
    plan = _plan_of(budgets)
    base = config or (plan.config if plan is not None else TCAConfig())
    changes = {name: value for name, value in (("block_size", block_size), ("window", window)) if value is not None}
    config = replace(base, **changes)  # TCAConfig checks both, saying what is allowed
    if plan is not None:
        plan.check_matches(plan.num_layers, plan.num_kv_heads, config.block_size)  # budgets are over 1..b
        return PressSettings(config, plan, None)
    if isinstance(budgets, str):  # a name of BUDGET_NAMES (a path was taken as a plan)
        return PressSettings(config, None, dense_budgets(config.block_size) if budgets == "dense" else None)
    if isinstance(budgets, torch.Tensor) and budgets.shape[-1:] != (config.num_retain_counts,):
        raise ValueError(
            f"budgets must be [K] or [KV heads, K] with K = {config.num_retain_counts} retain counts for block_size "
            f"{config.block_size} (1, 2, ..., {config.block_size}), got shape {tuple(budgets.shape)}"
        )
    if budgets is not None and not isinstance(budgets, torch.Tensor):
        raise TypeError(
            f"budgets must be None, {' or '.join(map(repr, BUDGET_NAMES))}, a torch.Tensor of probabilities, a "
            f"tca.BudgetPlan or the path of a plan JSON file, got {type(budgets).__name__}"
        )
    return PressSettings(config, None, budgets)


def _plan_of(budgets) -> BudgetPlan | None:
    """The plan that `budgets` names (a BudgetPlan or the path of a plan file), else None."""
    if isinstance(budgets, BudgetPlan):
        return budgets
    if isinstance(budgets, str) and budgets in BUDGET_NAMES:
        return None
    if isinstance(budgets, (str, os.PathLike)):
        path = Path(budgets)
        if not path.is_file():
            raise ValueError(
                f"budget plan file not found: {str(path)!r}; give a plan JSON from `python -m tca calibrate`, a "
                f"tca.BudgetPlan, or one of {BUDGET_NAMES}"
            )
        return BudgetPlan.load(path)
    return None


def check_model(model, settings: PressSettings):
    """Raise a clear error for a model the press cannot compress faithfully; returns its shape."""
    from ..models.attention import IMPLEMENTATIONS
    from ..models.budget_plans import check_plan
    from ..models.shape import model_shape

    shape = model_shape(model)
    if shape.native_layers:
        raise ValueError(
            f"TCAPress supports models whose layers all use full attention; layers {list(shape.native_layers)} of "
            "this model use a sliding window"
        )
    implementation = model.config._attn_implementation
    if implementation in IMPLEMENTATIONS:
        raise ValueError(
            f"the model runs TCA attention ({implementation!r}); a press compresses a dense prefill: call "
            "tca.models.disable_tca(model) first"
        )
    if implementation == "eager":
        raise ValueError(
            "TCAPress masks evicted positions through kvpress's attention patch, which eager attention bypasses; "
            "load the model with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
        )
    if settings.plan is not None:
        check_plan(settings.plan, shape, settings.config)
    else:
        check_budgets(settings.budgets, shape.num_kv_heads, settings.config, "cpu")
    return shape


def last_query(module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The prompt's last query [B, HQ, 1, D] of attention layer `module`, position embedding applied, recomputed
    from its input (kvpress's projection, then the modeling file's own `apply_rotary_pos_emb`)."""
    from kvpress.utils import get_prerope_query_states

    rotate = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if rotate is None:
        raise ValueError(f"{type(module).__name__}'s modeling file has no apply_rotary_pos_emb; TCAPress cannot "
                         "recompute its queries")
    q = get_prerope_query_states(module, hidden_states[:, -1:])
    cos, sin = position_embeddings
    return rotate(q, q, cos[:, -1:], sin[:, -1:])[0]


def _press_class():
    kvpress = import_kvpress("TCAPress and the kvpress peers")

    @dataclass
    class TCAPress(kvpress.BasePress):
        """TCA-Attention's post-prefill cache as a kvpress press (module docstring: what it keeps, and its limits).

        budgets: None or "default" (tca.default_budgets for every head), "dense" (everything kept: the press
            changes nothing), a budget tensor [K] or [KV heads, K] for every layer, a tca.BudgetPlan, or the path
            of a plan JSON file (`python -m tca calibrate`; one configuration per layer and KV head).
        block_size, window: TCA's b and w (default: the plan's, else 128 and 4096); they replace config's.
        config: a tca.TCAConfig (default: the plan's, else TCAConfig()); its alpha and mass_scale are used too.
        backend: the tca backend whose selection runs ("auto": the best one for the device, as tca.attention).

        After a prefill, `kept_counts[layer]` ([B, KV heads] int64) holds the tokens each head kept and
        `kept_fraction()` their share of a dense cache (kvpress's masked slots count as not kept).
        """

        budgets: object = None
        block_size: int | None = None
        window: int | None = None
        config: TCAConfig | None = None
        backend: str = "auto"
        kept_counts: dict = field(default_factory=dict, init=False, repr=False)
        prefill_length: int = field(default=0, init=False, repr=False)

        def __post_init__(self):
            self.settings = press_settings(self.budgets, self.block_size, self.window, self.config, self.backend)

        def post_init_from_model(self, model):
            check_model(model, self.settings)
            self.kept_counts = {}

        def forward_hook(self, module, input, kwargs, output):
            # kvpress 0.5.5 reads arguments that transformers 5 renamed or dropped (tca.eval.presses).
            return super().forward_hook(module, input, hook_kwargs(module, kwargs), output)

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            config, layer = self.settings.config, module.layer_idx
            budgets = check_budgets(self.settings.layer_budgets(layer), keys.shape[1], config, keys.device)
            q_last = last_query(module, hidden_states, kwargs["position_embeddings"])
            scale = check_scale(getattr(module, "scaling", None), keys.shape[-1])
            positions, counts = post_prefill_positions(q_last, keys, budgets, config, scale, self.backend)
            keys, values, module.masked_key_indices = gather_kept(keys, values, positions, counts)
            self.kept_counts[layer] = counts
            self.prefill_length = hidden_states.shape[1]
            return keys, values

        def kept_fraction(self) -> float:
            """Tokens kept over all layers, batch and KV heads by the last prefill / those of a dense cache."""
            if not self.kept_counts:
                raise ValueError("no prefill has run under this press yet: use `with press(model): model(...)`")
            kept = sum(int(c.sum()) for c in self.kept_counts.values())
            return kept / sum(c.numel() * self.prefill_length for c in self.kept_counts.values())

    TCAPress.__module__, TCAPress.__qualname__ = __name__, "TCAPress"
    return TCAPress
