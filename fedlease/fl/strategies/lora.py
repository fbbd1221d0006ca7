"""Single-LoRA baselines: every client trains one LoRA adapter (and its task head).

=============  ===========================  =========================  =======================
method         sends up / gets down         stays on the client        paper
=============  ===========================  =========================  =======================
``local``      nothing                      the whole adapter          -
``fedit``      A and B (FedAvg)             head                       Zhang et al. 2024
``ffa_lora``   B (FedAvg); A frozen at its  head                       Sun et al. 2024
               shared random init
``fedsa_lora`` A (FedAvg)                   B, head                    Guo et al. 2025
=============  ===========================  =========================  =======================

All clients start from the same seeded initialisation (A random, B zero), so FFA-LoRA's frozen A
is identical everywhere and averaging B alone is exact FedAvg of the product.
"""

from __future__ import annotations

from .base import SharedLoRA, Strategy, is_expert, is_lora_a, is_lora_b


class Local(Strategy):
    """No communication: each client fine-tunes its own LoRA."""

    name = "local"


class FedIT(SharedLoRA):
    """FedAvg of the whole LoRA adapter (A and B) over all clients."""

    name = "fedit"
    shared = staticmethod(is_expert)


class FFALoRA(SharedLoRA):
    """A frozen at its (common) initialisation; only B trains and is averaged."""

    name = "ffa_lora"
    shared = staticmethod(is_lora_b)
    frozen_keys = staticmethod(is_lora_a)


class FedSALoRA(SharedLoRA):
    """A (the general knowledge) is averaged; B (client-specific) stays local."""

    name = "fedsa_lora"
    shared = staticmethod(is_lora_a)
