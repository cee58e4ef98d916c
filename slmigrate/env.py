"""Every environment variable slmigrate reads, named once."""

import os

WORKSPACE = "SLMIGRATE_WORKSPACE"
ENCRYPTION_KEY = "SLMIGRATE_ENCRYPTION_KEY"
ADMIN_TOKEN = "SLMIGRATE_ADMIN_TOKEN"
STORE = "SLMIGRATE_STORE"
MODEL_CACHE = "SLMIGRATE_MODEL_CACHE"
EMBED_CACHE = "SLMIGRATE_EMBED_CACHE"  # entries in the in-memory embedding LRU cache (embed.py)

DEFAULT_WORKSPACE = ".slmigrate"


def get(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def offline_hub() -> None:
    """Keep Hugging Face libraries from reaching for the hub: slmigrate only uses local or packaged models."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
