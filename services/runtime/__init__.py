"""What every tensorgate service shares: settings, logging, errors, metrics and the gRPC server."""
