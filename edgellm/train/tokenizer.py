"""Byte-level BPE for the built-in models: trained with `tokenizers`, saved as HF tokenizer files.

Byte-level means every string encodes (no unknown token), which an engine's default model must guarantee.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from edgellm.errors import EdgeLLMError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *CHAT_TOKENS)
END_OF_TURN = "<|end|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class TokenizerFileError(EdgeLLMError):
    """A tokenizer given for reuse is missing, unreadable or lacks edgellm's special tokens."""


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with SPECIAL_TOKENS at ids 0..6 whose encodings start with BOS; same texts → same file."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return tokenizer


def load_tokenizer_file(path: Path) -> Tokenizer:
    """The tokenizer.json at `path` (a file or a directory holding one), checked for SPECIAL_TOKENS."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerFileError(f"no tokenizer file at {file}; pass a tokenizer.json or a directory holding one")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception on parse errors
        raise TokenizerFileError(f"{file} could not be parsed ({e})") from e
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise TokenizerFileError(f"{file} lacks special token(s) {', '.join(missing)}; "
                                 "reuse a tokenizer made by `edgellm train`")
    return tokenizer


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text with BOS prepended (parallel inside `tokenizers`)."""
    return [e.ids for e in tokenizer.encode_batch(texts)]


def save_tokenizer(tokenizer: Tokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (special tokens, chat template) and generation_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": list(CHAT_TOKENS),
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    generation = {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[END_OF_TURN]], "pad_token_id": ids[PAD]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
