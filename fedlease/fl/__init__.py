"""The federated simulator: ``fedlease.fl.run(config) -> Summary``."""

from .allocation import Allocation, allocate, b_distance_matrix, cluster, init_experts
from .config import ConfigError, FLConfig, from_dict, load_config
from .simulator import Summary, run

__all__ = [
    "Allocation",
    "ConfigError",
    "FLConfig",
    "Summary",
    "allocate",
    "b_distance_matrix",
    "cluster",
    "from_dict",
    "init_experts",
    "load_config",
    "run",
]
