"""Ready-made attribution workloads on real models (optional dependencies)."""
