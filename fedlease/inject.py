"""Put ``MoELoRALinear`` layers into an existing model, the way PEFT places LoRA."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .dropout import use_fast_dropout
from .layer import MoELoRALinear
from .routing import RoutingSpec


@dataclass
class MoELoRAConfig:
    """Where and how to add MoE-LoRA layers.

    ``target_modules``: a module is replaced when its name equals a target or ends with
    ``"." + target`` (PEFT's rule). ``trainable_modules``: modules (same matching rule) that stay
    trainable besides the adapters, e.g. a task head ``["classifier"]``.
    """

    num_experts: int = 1
    rank: int = 4
    alpha: float = 16
    dropout: float = 0.0
    routing: str = "adaptive"
    top_k: int | None = None
    own_expert: int = 0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    trainable_modules: list[str] = field(default_factory=list)

    def validate(self) -> None:
        RoutingSpec.make(self.routing, self.num_experts, self.top_k, self.own_expert)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    def to_dict(self) -> dict:
        return asdict(self)


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def moe_lora_layers(model: nn.Module) -> dict[str, MoELoRALinear]:
    """Every ``MoELoRALinear`` in ``model`` by its module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoELoRALinear)}


def inject_moe_lora(
    model: nn.Module, config: MoELoRAConfig, backend: str = "auto", fast_dropout: bool = False
) -> nn.Module:
    """Replace each targeted ``nn.Linear`` with a ``MoELoRALinear``; freeze all but the adapters
    and ``config.trainable_modules``. ``fast_dropout``: also give the model's own dropouts the
    counter-based CPU dropout (:func:`fedlease.dropout.use_fast_dropout`). Modifies ``model`` in
    place and returns it."""
    config.validate()
    targets = [(n, m) for n, m in model.named_modules() if n and _matches(n, config.target_modules)]
    for t in config.target_modules:
        if not any(n == t or n.endswith("." + t) for n, _ in targets):
            raise ValueError(f"target module {t!r} matches no module of {type(model).__name__}")
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}, not an nn.Linear: "
                "only linear layers can carry MoE-LoRA"
            )
    for missing in [t for t in config.trainable_modules]:
        if not any(_matches(n, [missing]) for n, _ in model.named_modules() if n):
            raise ValueError(f"trainable module {missing!r} matches no module")
    model.requires_grad_(False)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MoELoRALinear(
            module,
            config.num_experts,
            config.rank,
            config.alpha,
            config.dropout,
            config.routing,
            config.top_k,
            config.own_expert,
            backend=backend,
        )
        setattr(parent, child, layer)
    for name, module in model.named_modules():
        if name and _matches(name, config.trainable_modules):
            module.requires_grad_(True)
    model.moe_lora_config = config
    if fast_dropout:
        use_fast_dropout(model)
    return model


def set_own_expert(model: nn.Module, expert: int) -> None:
    """Make ``expert`` the own expert of every MoE-LoRA layer in ``model``."""
    for layer in moe_lora_layers(model).values():
        layer.own_expert = expert
    if hasattr(model, "moe_lora_config"):
        model.moe_lora_config.own_expert = expert
