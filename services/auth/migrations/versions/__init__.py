"""The auth service's migrations, oldest first; each file is frozen once released."""
