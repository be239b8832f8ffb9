"""Model optimization as a registry operation: jobs that derive quantized and pruned
versions of a model version and measure them beside their parent."""
