"""Datasets, partitions and the federated client view used by every algorithm."""

from fedmtl.data.datasets import list_datasets, load_federated
from fedmtl.data.federated import ClientData, FederatedData, TaskSpec
from fedmtl.data.paths import resolve_data_dir

__all__ = ["ClientData", "FederatedData", "TaskSpec", "list_datasets", "load_federated", "resolve_data_dir"]
