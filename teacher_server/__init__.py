"""The teacher server: loads a causal LM once and serves teacher statistics over gRPC."""

__version__ = "0.1.0"
