"""The gateway: tensorgate's only public surface, routing calls to inference workers."""
