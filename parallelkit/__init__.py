"""parallelkit: the same GPT on the same data under every distributed-training backend, measured side by side."""
__version__ = "0.1.0"
