"""The auth service's schema migrations (Alembic), run by `AuthStore.open`."""
