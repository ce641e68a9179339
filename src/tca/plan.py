"""Budget plans: the result of calibration (docs/semantics.md section 6), saved as readable JSON.

A plan holds, per layer and KV head, the chosen budget configuration p*, its retained mass a and its cost
E[p*]; `plan.budgets(layer)` gives the [HKV, len(K)] tensor that drives inference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budgets import dense_budgets, expected_cost
from .config import TCAConfig

FORMAT = "tca-budget-plan/1"


@dataclass(frozen=True)
class HeadBudget:
    """p* of one KV head, with its retained mass a_m, cost E[p*] and candidate index (None = dense)."""

    budgets: list[float]
    retained_mass: float
    cost: float
    candidate: int | None

    def keep_ratio(self, block_size: int) -> float:
        """Expected fraction of each budgeted block kept: E[p*] / b."""
        return self.cost / block_size


def choose_budgets(masses: torch.Tensor, candidates: torch.Tensor, tau: float, block_size: int) -> list[HeadBudget]:
    """Section 6, step 3, per KV head: the cheapest candidate with a_m >= tau (ties to the smaller m), else the
    dense configuration. masses: [M, HKV], candidates: [M, len(K)]."""
    costs = expected_cost(candidates)
    heads = []
    for h in range(masses.shape[1]):
        ok = [m for m in range(len(candidates)) if masses[m, h] >= tau]
        if ok:
            best = min(ok, key=lambda m: (costs[m].item(), m))
            heads.append(HeadBudget(candidates[best].tolist(), float(masses[best, h]), float(costs[best]), best))
        else:
            heads.append(HeadBudget(dense_budgets(block_size).tolist(), 1.0, float(block_size), None))
    return heads


@dataclass
class BudgetPlan:
    config: TCAConfig
    layers: list[list[HeadBudget]]
    metadata: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    def budgets(self, layer: int) -> torch.Tensor:
        """[HKV, len(K)] float64 budget configurations of `layer`."""
        return torch.tensor([head.budgets for head in self.layers[layer]], dtype=torch.float64)

    def mean_keep_ratio(self) -> float:
        """Mean over layers and heads of E[p*] / b (of the budgeted blocks; the window is always kept). The
        layers listed in metadata["native_layers"] (a hybrid model's sliding-window layers, which keep the
        model's own attention) are left out."""
        native = set(self.metadata.get("native_layers", ()))
        ratios = [h.keep_ratio(self.config.block_size) for i, layer in enumerate(self.layers) if i not in native for h in layer]
        return sum(ratios) / len(ratios) if ratios else 1.0

    def check_matches(self, num_layers: int, num_kv_heads: int, block_size: int | None = None) -> None:
        """Raise a clear error if this plan was made for another model shape."""
        if self.num_layers != num_layers:
            raise ValueError(f"budget plan has {self.num_layers} layers but the model has {num_layers}; calibrate for this model")
        if self.num_kv_heads != num_kv_heads:
            raise ValueError(
                f"budget plan has {self.num_kv_heads} KV heads per layer but the model has {num_kv_heads}; calibrate for this model"
            )
        if block_size is not None and block_size != self.config.block_size:
            raise ValueError(
                f"budget plan was calibrated with block_size {self.config.block_size}, not {block_size}; "
                "use the plan's config (plan.config) or calibrate again"
            )

    def to_dict(self) -> dict:
        b = self.config.block_size
        return {
            "format": FORMAT,
            "metadata": self.metadata,
            "config": self.config.to_dict(),
            "retain_counts": list(self.config.retain_counts),
            "mean_keep_ratio": self.mean_keep_ratio(),
            "layers": [
                [
                    {
                        "candidate": h.candidate if h.candidate is not None else "dense",
                        "retained_mass": h.retained_mass,
                        "cost": h.cost,
                        "keep_ratio": h.keep_ratio(b),
                        "budgets": h.budgets,
                    }
                    for h in layer
                ]
                for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> BudgetPlan:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a tca budget plan: expected 'format': {FORMAT!r}")
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            if isinstance(error, ValueError) and str(error).startswith(("malformed", "budget plan")):
                raise
            # A missing field or a field of the wrong JSON type: say so as a ValueError, like every other check.
            raise ValueError(
                f"malformed tca budget plan ({type(error).__name__}: {error}); expected 'config' (a dict) and "
                "'layers' (a list of layers, each a list of heads with 'budgets', 'retained_mass', 'cost', "
                "'candidate'); save plans with BudgetPlan.save"
            ) from error

    @staticmethod
    def _check_sections(data: dict) -> None:
        """Each section present, of its JSON type and not empty (a missing or null one named as such)."""
        for key, kind in (("config", dict), ("layers", list)):
            if data.get(key) is None:
                state = "is missing" if key not in data else "is null"
                raise ValueError(f"malformed tca budget plan: section {key!r} {state}; save plans with BudgetPlan.save")
            if not isinstance(data[key], kind):
                raise ValueError(
                    f"malformed tca budget plan: section {key!r} must be a JSON {'object' if kind is dict else 'list'}, "
                    f"got {type(data[key]).__name__}"
                )
        if not isinstance(data.get("metadata", {}), dict):
            raise ValueError(f"malformed tca budget plan: section 'metadata' must be a JSON object, got {data['metadata']!r}")
        if not data["config"]:
            raise ValueError("malformed tca budget plan: section 'config' is empty (it records the block size and window)")
        if not data["layers"]:
            raise ValueError("malformed tca budget plan: 'layers' is empty (a plan has one entry per model layer)")
        for li, layer in enumerate(data["layers"]):
            if not isinstance(layer, list) or not layer:
                raise ValueError(f"malformed tca budget plan: layer {li} must be a non-empty list of KV heads, got {layer!r}")
            for hi, head in enumerate(layer):
                if not isinstance(head, dict):
                    raise ValueError(f"malformed tca budget plan: layer {li} head {hi} must be a JSON object, got {head!r}")
                missing = [f for f in ("budgets", "retained_mass", "cost") if head.get(f) is None]
                if missing:
                    raise ValueError(f"malformed tca budget plan: layer {li} head {hi} has no {', '.join(missing)}")

    @classmethod
    def _from_dict(cls, data: dict) -> BudgetPlan:
        cls._check_sections(data)
        config = TCAConfig.from_dict(data["config"])
        n = config.num_retain_counts
        layers = []
        for li, layer in enumerate(data["layers"]):
            heads = []
            for hi, h in enumerate(layer):
                p = [float(x) for x in h["budgets"]]
                if len(p) != n or any(not math.isfinite(x) or x < 0 for x in p) or abs(sum(p) - 1) > 1e-4:
                    raise ValueError(
                        f"budget plan layer {li} head {hi}: budgets must be {n} non-negative numbers summing to 1, got {p}"
                    )
                candidate = h.get("candidate")
                heads.append(HeadBudget(p, float(h["retained_mass"]), float(h["cost"]), None if candidate == "dense" else candidate))
            layers.append(heads)
        if len({len(layer) for layer in layers}) > 1:
            raise ValueError("budget plan layers have different numbers of KV heads")
        return cls(config=config, layers=layers, metadata=data.get("metadata") or {})

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> BudgetPlan:
        """Read a plan saved by `save`. A missing file raises FileNotFoundError; anything else that is not a
        plan (not JSON, a missing or null section) raises ValueError naming the file and the problem."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"budget plan file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a tca budget plan: not valid JSON ({error})") from None
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
