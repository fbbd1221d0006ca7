"""Federated GLUE data: loading, partitioning among clients, tokenisation and batching."""

from .glue import DATA_DIR_ENV, TASKS, DataError, TaskSpec, load_split, resolve_data_dir, task_spec
from .partition import partition_indices
from .tokenize import ClientData, build_client_data, collate, source_for

__all__ = [
    "DATA_DIR_ENV",
    "TASKS",
    "ClientData",
    "DataError",
    "TaskSpec",
    "build_client_data",
    "collate",
    "load_split",
    "partition_indices",
    "resolve_data_dir",
    "source_for",
    "task_spec",
]
