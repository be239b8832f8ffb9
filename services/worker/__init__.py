"""The inference worker: owns one Triton, loads models into it, forwards calls to it."""
