"""Config sections of cross-cutting features (selection, privacy, robustness, corruption).

Each module holds one feature's schema and imports nothing but pydantic and ``fedmtl.config_base``,
so ``fedmtl.config`` can include them without importing the features themselves."""
