"""tensorgate's back-end services: registry, auth, worker, and the runtime they share."""
