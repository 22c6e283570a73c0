"""Datasets, partitions and the federated client view used by every algorithm.

``register_dataset`` plugs in a reader from user code; it returns one of ``Pooled``, ``Clients`` or
``ClientSplits`` (``fedmtl.data.raw``)."""

from fedmtl.data.config import DataConfig
from fedmtl.data.datasets import list_datasets, load_federated, register_dataset
from fedmtl.data.federated import ClientData, FederatedData, TaskSpec
from fedmtl.data.paths import resolve_data_dir
from fedmtl.data.raw import Clients, ClientSplits, Pooled

__all__ = [
    "ClientData",
    "ClientSplits",
    "Clients",
    "DataConfig",
    "FederatedData",
    "Pooled",
    "TaskSpec",
    "list_datasets",
    "load_federated",
    "register_dataset",
    "resolve_data_dir",
]
