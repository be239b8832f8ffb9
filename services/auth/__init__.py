"""The auth/quota service: tenants, API keys, quotas, prices and the usage ledger."""
