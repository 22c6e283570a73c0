"""Client-side sample selection: score vectors from a multi-task autoencoder, detectors (one-class
SVM, isolation forest, adaptive loss threshold, near-duplicates) and the algorithm wrapper that
trains each client on the samples it keeps (see docs/selection.md)."""

from fedmtl.selection.detectors import decision, fit_iforest, fit_ocsvm
from fedmtl.selection.scores import forward_parts, near_duplicates, score_vectors

__all__ = ["decision", "fit_iforest", "fit_ocsvm", "forward_parts", "near_duplicates", "score_vectors"]
