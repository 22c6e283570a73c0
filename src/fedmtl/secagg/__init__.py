"""secagg (see docs)."""
