"""Every environment variable slmigrate reads, named once."""

import os

WORKSPACE = "SLMIGRATE_WORKSPACE"
ENCRYPTION_KEY = "SLMIGRATE_ENCRYPTION_KEY"
ADMIN_TOKEN = "SLMIGRATE_ADMIN_TOKEN"
SLM_API_KEY = "SLMIGRATE_SLM_API_KEY"  # bearer key of `serve --slm-endpoint` (and `--adapters-only`)
STORE = "SLMIGRATE_STORE"
MODEL_CACHE = "SLMIGRATE_MODEL_CACHE"
EMBED_CACHE = "SLMIGRATE_EMBED_CACHE"  # entries in the in-memory embedding LRU cache (cluster/embed.py)
CPU_BF16 = "SLMIGRATE_CPU_BF16"  # 1/0: serve and evaluate a specialist in bfloat16 on the CPU (evaluate/greedy.py)

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


# Library chatter a user of the CLI cannot act on: warnings about deprecations inside other libraries, a
# bitsandbytes CPU kernel that is only fetched from the hub (QLoRA runs on CUDA anyway), and the libraries' own
# progress bars (our commands draw one bar per stage).
_QUIET_LOGGERS = ("bitsandbytes", "kernels", "peft")
_QUIET_WARNINGS_FROM = r"(transformers|peft|accelerate|torch|datasets|sentence_transformers|bitsandbytes)(\.|$)"


def quiet_libraries() -> None:
    """Keep the terminal to slmigrate's own output: called by the CLI and in its worker processes, never on
    import (a library user's logging is theirs). Errors from the libraries still show."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' "Loading weights" bars
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=_QUIET_WARNINGS_FROM)
