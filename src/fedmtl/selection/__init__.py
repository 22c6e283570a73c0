"""selection (see docs)."""
