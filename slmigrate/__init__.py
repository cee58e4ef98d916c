"""slmigrate: migrate an AI agent's LLM calls to small, specialised models."""

__version__ = "0.1.0"
