"""The HTTP edge: the whole Ollama API and its OpenAI-compatible /v1, served from the fleet."""
