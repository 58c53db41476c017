"""The agent: one per Ollama instance; probes GPUs, claims work, streams replies."""
