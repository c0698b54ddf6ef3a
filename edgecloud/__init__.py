"""edgecloud: edge–cloud collaborative inference for factory devices (shared core)."""

__version__ = "0.1.0"
