"""minimoe: Mixture-of-Experts language models, small enough to read, checked against transformers."""

__version__ = "0.1.0"
