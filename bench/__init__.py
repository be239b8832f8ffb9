"""`make bench`: what the gateway and worker add on top of Triton, measured in one run."""
