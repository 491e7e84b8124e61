"""postdiff: an edge deployment compiler for diffusion models."""

__version__ = "0.1.0"
