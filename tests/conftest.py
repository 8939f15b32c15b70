"""Shared fixtures: small random LLaDA configs and the shipped tokenizer. Tests run on CPU in float32."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from llada_trm import LLaDAConfig, LLaDAModelLM  # noqa: E402
from llada_trm.embedded.assets import TINY_LLADA_PATH  # noqa: E402


def make_config(**overrides) -> LLaDAConfig:
    fields = dict(
        d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=48, vocab_size=64, embedding_size=64,
        rope_theta=10000.0, eos_token_id=1, pad_token_id=1, bos_token_id=0, mask_token_id=2,
    )
    fields.update(overrides)
    return LLaDAConfig(**fields)


def shipped_vocab_size(tokenizer) -> int:
    """The shipped tokenizer's size rounded up to a multiple of 64, as the pretraining command sizes the model."""
    return 64 * -(-len(tokenizer) // 64)


@pytest.fixture
def tiny_config() -> LLaDAConfig:
    return make_config()


@pytest.fixture
def tiny_backbone(tiny_config) -> LLaDAModelLM:
    torch.manual_seed(0)
    return LLaDAModelLM(tiny_config).eval()


@pytest.fixture(scope="session")
def shipped_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_LLADA_PATH)


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory):
    """A small random LLaDA with the shipped tokenizer: fast, and independent of the pretrained weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_LLADA_PATH)
    vocab = shipped_vocab_size(tokenizer)
    config = LLaDAConfig(
        d_model=32, n_heads=2, n_layers=1, mlp_hidden_size=64, vocab_size=vocab, embedding_size=vocab,
        rope_theta=10000.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, mask_token_id=tokenizer.mask_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone")
    LLaDAModelLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
