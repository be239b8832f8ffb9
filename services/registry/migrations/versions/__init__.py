"""The registry's migrations, oldest first; each file is frozen once released."""
