"""tensorgate's back-end services: the inference worker and the runtime every service shares."""
