"""Budget plans for a whole model: resolve what the user gave (None, a BudgetPlan, a path) and check it fits.

A plan holds per layer and KV head a budget configuration (docs/semantics.md sections 1 and 6); the model's
attention reads `plan.budgets(layer)` ([HKV, len(K)] float64) at every call.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..budgets import default_budgets, dense_budgets, expected_cost
from ..config import TCAConfig
from ..plan import BudgetPlan, HeadBudget
from .shape import ModelShape

PLANS_DIR = Path(__file__).with_name("plans")


def uniform_plan(shape: ModelShape, config: TCAConfig, budgets, kind: str) -> BudgetPlan:
    """The same budget configuration p [len(K)] for every layer and KV head."""
    p = [float(x) for x in budgets]
    cost = float(expected_cost(budgets))
    head = HeadBudget(budgets=p, retained_mass=float("nan"), cost=cost, candidate=None)
    layers = [[head] * shape.num_kv_heads for _ in range(shape.num_layers)]
    return BudgetPlan(config=config, layers=layers, metadata={**shape.to_dict(), "plan": kind})


def default_plan(shape: ModelShape, config: TCAConfig | None = None) -> BudgetPlan:
    """Default budgets (semantics.md section 1) for all layers and heads: nothing calibrated."""
    config = config or TCAConfig()
    return uniform_plan(shape, config, default_budgets(config.block_size), "default")


def dense_plan(shape: ModelShape, config: TCAConfig | None = None) -> BudgetPlan:
    """Dense budgets for all layers and heads: every token kept, TCA equals dense causal attention."""
    config = config or TCAConfig()
    return uniform_plan(shape, config, dense_budgets(config.block_size), "dense")


def shipped_plan_path(name: str) -> Path:
    """Path of a plan shipped in the package (src/tca/models/plans/<name>.json)."""
    path = PLANS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PLANS_DIR.glob("*.json"))
        raise ValueError(f"no shipped plan named {name!r}; shipped plans: {known}")
    return path


def resolve_plan(plan, shape: ModelShape, config: TCAConfig | None = None) -> BudgetPlan:
    """A BudgetPlan for this model from None (default budgets), a BudgetPlan, or a path to plan JSON.

    With both a plan and a config, the config must have the plan's block size (budgets are distributions over
    1, 2, ..., b); its window, alpha and mass scale replace the plan's.
    """
    if config is not None and not isinstance(config, TCAConfig):
        raise TypeError(f"config must be a tca.TCAConfig or None, got {type(config).__name__}")
    if plan is None:
        return default_plan(shape, config)
    if isinstance(plan, (str, os.PathLike)):
        path = Path(plan)
        if not path.is_file():
            raise ValueError(f"budget plan file not found: {str(path)!r}; make one with `python -m tca calibrate`")
        plan = BudgetPlan.load(path)
    if not isinstance(plan, BudgetPlan):
        raise TypeError(f"plan must be None, a tca.BudgetPlan or a path to a plan JSON file, got {type(plan).__name__}")
    check_plan(plan, shape, config)
    if config is not None and config != plan.config:
        plan = BudgetPlan(config=config, layers=plan.layers, metadata=plan.metadata)
    return plan


def check_plan(plan: BudgetPlan, shape: ModelShape, config: TCAConfig | None = None) -> None:
    """Raise a clear error if the plan was made for another model (layers, KV heads, head dim) or block size."""
    plan.check_matches(shape.num_layers, shape.num_kv_heads, None if config is None else config.block_size)
    head_dim = plan.metadata.get("head_dim")
    if head_dim is not None and int(head_dim) != shape.head_dim:
        raise ValueError(
            f"budget plan was calibrated for head dim {head_dim} but the model has {shape.head_dim}; "
            "calibrate for this model"
        )
    native = plan.metadata.get("native_layers")
    if native is not None and tuple(native) != shape.native_layers:
        raise ValueError(
            f"budget plan was made for a model whose sliding-window layers are {list(native)}, but this model's are "
            f"{list(shape.native_layers)}; calibrate for this model"
        )
