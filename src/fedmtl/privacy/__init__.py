"""privacy (see docs)."""
