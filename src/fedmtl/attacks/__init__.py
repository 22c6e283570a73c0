"""attacks (see docs)."""
