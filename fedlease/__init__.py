"""fedlease: federated fine-tuning with mixtures of LoRA experts (FedLEASE)."""

from .adapter_io import adapter_state_dict, load_adapter, load_adapter_state_dict, save_adapter
from .dropout import use_fast_dropout
from .first_token import use_first_token_output
from .inject import MoELoRAConfig, inject_moe_lora, moe_lora_layers, set_own_expert
from .layer import MoELoRALinear
from .ops import available_backends, moe_lora, moe_lora_linear
from .packing import use_packing
from .peft_io import experts_from_peft, export_expert
from .routing import RoutingSpec, route
from .version import __version__

__all__ = [
    "MoELoRAConfig",
    "MoELoRALinear",
    "RoutingSpec",
    "__version__",
    "adapter_state_dict",
    "available_backends",
    "experts_from_peft",
    "export_expert",
    "inject_moe_lora",
    "load_adapter",
    "load_adapter_state_dict",
    "moe_lora",
    "moe_lora_layers",
    "moe_lora_linear",
    "route",
    "save_adapter",
    "set_own_expert",
    "use_fast_dropout",
    "use_first_token_output",
    "use_packing",
]
