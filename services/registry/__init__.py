"""The model registry service: models, versions, artifacts, aliases, deployments, a feed."""
