"""What several test modules share: tiny models, batches and run flags. A support module, not a test module:
test modules import from here (and conftest's fixtures), never from each other."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_config

from llada_trm import LLaDAModelLM
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.hybrid import LLaDATRMHybrid

PAD = 1
CHUNK, MASK, EOS = 4, 2, 1  # chunk size of tiny_hybrid; make_config's mask and EOS ids
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [20, 21]]  # padded widths 8, 12, 4


def randomise_(model, generator: torch.Generator, std: float) -> None:
    """Random weights whose predictions depend on context. The default 0.02 init gives near-uniform logits with
    one argmax everywhere, which would make most comparisons vacuous."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) * (1.0 if "wte" in name else std))


def make_hybrid(chunk_size=4, steps=3, seed=0, **overrides) -> LLaDATRMHybrid:
    torch.manual_seed(seed)
    backbone = LLaDAModelLM(make_config())
    config = HybridConfig(
        chunk_size=chunk_size, max_recursive_steps=steps, min_recursive_steps=1, head_hidden_size=16, head_heads=2,
        **overrides,
    )
    model = LLaDATRMHybrid(config, backbone=backbone)
    # A trained-looking head: out_proj starts at zero, which would hide every head computation from the logits.
    torch.nn.init.normal_(model.head.out_proj.weight, std=0.3)
    return model


def make_batch(prompt_lengths, chunk_counts, chunk_size, masked, seed=0):
    """Left-padded prompts on a chunk boundary, reasoning chunks, right padding with whole pad chunks."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_length, chunks in zip(prompt_lengths, chunk_counts):
        padded_prompt = -(-prompt_length // chunk_size) * chunk_size
        pad = padded_prompt - prompt_length
        ids = [PAD] * pad + torch.randint(3, 64, (prompt_length + chunks * chunk_size,), generator=g).tolist()
        chunk_index = [-1] * padded_prompt + [k for k in range(chunks) for _ in range(chunk_size)]
        attention = [0] * pad + [1] * (len(ids) - pad)
        rows.append((ids, chunk_index, attention))
    length = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [PAD] * (length - len(r[0])) for r in rows])
    chunk_index = torch.tensor([r[1] + [-1] * (length - len(r[1])) for r in rows])
    attention = torch.tensor([r[2] + [0] * (length - len(r[2])) for r in rows])
    labels = torch.where(chunk_index >= 0, ids, torch.full_like(ids, -100))
    chunk_is_masked = torch.zeros(len(rows), max(chunk_counts), dtype=torch.bool)
    for b, chunks in enumerate(masked):
        chunk_is_masked[b, chunks] = True
    is_masked_position = torch.gather(chunk_is_masked, 1, chunk_index.clamp(min=0)) & (chunk_index >= 0)
    ids = torch.where(is_masked_position, torch.full_like(ids, 2), ids)
    return dict(input_ids=ids, attention_mask=attention, chunk_index=chunk_index, labels=labels,
                chunk_is_masked=chunk_is_masked)


def tiny_hybrid(steps=3, min_steps=1, vocab=64, max_sequence_length=64, seed=0, **overrides) -> LLaDATRMHybrid:
    """A random hybrid (`randomise_`) whose tokens depend on context and on the head (a zero out_proj would
    hide it)."""
    torch.manual_seed(seed)
    backbone_config = make_config(vocab_size=vocab, embedding_size=vocab, max_sequence_length=max_sequence_length)
    backbone = LLaDAModelLM(backbone_config)
    g = torch.Generator().manual_seed(seed)
    randomise_(backbone, g, std=0.3)
    config = HybridConfig(chunk_size=CHUNK, max_recursive_steps=steps, min_recursive_steps=min_steps,
                          head_hidden_size=16, head_heads=2, **overrides)
    model = LLaDATRMHybrid(config, backbone=backbone).eval()
    torch.nn.init.normal_(model.head.out_proj.weight, std=0.3, generator=g)
    return model


def tiny_model(seed: int = 0, std: float = 0.3, max_sequence_length: int = 64) -> LLaDAModelLM:
    """A random backbone (`randomise_`) whose predictions depend on context."""
    torch.manual_seed(seed)
    model = LLaDAModelLM(make_config(max_sequence_length=max_sequence_length)).eval()
    randomise_(model, torch.Generator().manual_seed(seed), std)
    return model


def random_prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Token ids 3..63: no bos/eos/mask id."""
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_args(backbone_dir, output_dir, *extra):
    return [
        "--model_name_or_path", str(backbone_dir), "--output_dir", str(output_dir),
        "--num_synthetic_train", "24", "--num_synthetic_eval", "8", "--batch_size", "4", "--eval_split", "none",
        "--max_recursive_steps", "2", "--min_recursive_steps", "1", "--head_hidden_size", "32",
        "--eval_max_samples", "0", "--logging_steps", "1", "--max_length", "192", "--learning_rate", "0.01",
        "--save_steps", "1", "--save_total_limit", "3", *extra,
    ]


def assert_same_losses(actual: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in actual] == [step for step, _ in expected]
    assert [loss for _, loss in actual] == pytest.approx([loss for _, loss in expected], rel=1e-6)


def losses(output_dir) -> list[tuple[int, float]]:
    records = map(json.loads, (Path(output_dir) / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]
