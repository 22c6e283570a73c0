"""FDRMFL: multi-modal federated feature extraction for regression (docs/fdrmfl.md).

``data`` (multi-modal rows, layouts, splits), ``model`` (encoders, fusion, head, feature extraction)
and ``losses`` (the auxiliary terms); the ``fdrmfl`` algorithm is ``fedmtl.algorithms.fdrmfl``."""
