"""Federated data: loading, partitioning among clients, tokenisation and batching (each task
type's sources and every client's share: ``fedlease.data.sources``)."""

from .glue import DATA_DIR_ENV, TASKS, DataError, TaskSpec, load_split, resolve_data_dir, task_spec
from .partition import partition_indices
from .tokenize import ClientData, collate

__all__ = [
    "DATA_DIR_ENV",
    "TASKS",
    "ClientData",
    "DataError",
    "TaskSpec",
    "collate",
    "load_split",
    "partition_indices",
    "resolve_data_dir",
    "task_spec",
]
