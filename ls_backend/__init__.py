"""ls-backend: a Label Studio ML backend that fine-tunes a transformer as people label."""

__version__ = "0.1.0"
