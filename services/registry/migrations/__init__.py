"""The registry's schema migrations (Alembic), run by `RegistryStore.open`."""
