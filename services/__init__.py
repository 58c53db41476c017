"""Corral: many Ollama servers behind one Ollama-compatible endpoint, on NATS."""

__version__ = "0.1.0"
