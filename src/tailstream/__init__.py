"""tailstream: a streaming, event-driven recommender that keeps the long tail alive."""

__version__ = "0.1.0"
