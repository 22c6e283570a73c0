"""FDRMFL: multi-modal federated feature extraction for regression (docs/fdrmfl.md).

``data`` (multi-modal rows, layouts, splits), ``model`` (encoders, fusion, head), ``losses`` (the
auxiliary terms) and ``algorithm`` (the ``fdrmfl`` algorithm, registered by ``fedmtl.algorithms``).
Kept import-free so ``fedmtl.algorithms`` can import ``fedmtl.fdrmfl.algorithm`` without cycles."""
