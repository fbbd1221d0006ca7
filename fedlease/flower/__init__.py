"""FedLEASE (and every other method) on Flower: a ``ServerApp`` and a ``ClientApp``.

The server runs the same strategy objects and round loop as the in-process simulator; clients
reuse its client code. Only adapter, router and head tensors travel; each node loads the frozen
model itself. Client identity and data partition come from the node config (``partition-id``).
"""

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "fedlease.flower needs Flower: pip install 'fedlease[flower]' "
        "(or 'fedlease[flower-sim]' for the simulation engine)"
    ) from exc

from .logs import install as _install_log_filter

_install_log_filter()  # a user's error inside an app: one line in Flower's log
