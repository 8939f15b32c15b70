"""The embedded default: shipped tokenizer and pretrained tiny backbone load offline and actually learned."""

import torch
from transformers import AutoTokenizer

from llada_trm import LLaDAModelLM
from llada_trm.pretrain import encode_documents
from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.data.layout import MARKER, render_example
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.embedded.assets import TINY_LLADA_PATH, resolve_backbone_path
from llada_trm.inference.exact_match import (
    chunk_decoder_accuracy,
    default_new_token_budget,
    llada_sampler_accuracy,
    scored_rows,
)
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.training.diffusion import masked_token_accuracy


def test_shipped_tokenizer_round_trips_text_and_has_llada_special_tokens(shipped_tokenizer):
    text = render_example(**generate_split("test", 1)[0]) + " ünïcode ✓"
    assert shipped_tokenizer.decode(shipped_tokenizer(text)["input_ids"]) == text
    for token in ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"):
        assert shipped_tokenizer.convert_tokens_to_ids(token) != shipped_tokenizer.unk_token_id
    assert shipped_tokenizer.pad_token == shipped_tokenizer.eos_token == "<|endoftext|>"
    assert shipped_tokenizer.mask_token == "<|mdm_mask|>"
    chat = shipped_tokenizer.apply_chat_template([{"role": "user", "content": MARKER}], tokenize=False,
                                                 add_generation_prompt=True)
    assert chat.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_shipped_backbone_loads_offline_in_the_official_layout():
    assert resolve_backbone_path("tiny-llada") == str(TINY_LLADA_PATH)
    assert (TINY_LLADA_PATH / "config.json").is_file() and (TINY_LLADA_PATH / "model.safetensors").is_file()
    assert (TINY_LLADA_PATH / "model.safetensors").stat().st_size < 10 * 2**20
    model = LLaDAModelLM.from_pretrained(TINY_LLADA_PATH)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLADA_PATH)
    assert model.config.model_type == "llada"
    assert model.config.mask_token_id == tokenizer.mask_token_id
    assert model.config.vocab_size >= len(tokenizer)


def test_shipped_backbone_recovers_held_out_masked_tokens():
    """Masked-token accuracy at mask rate 0.15 on test-split problems (random weights give about 0)."""
    model = LLaDAModelLM.from_pretrained(TINY_LLADA_PATH).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLADA_PATH)
    ids, is_text, _ = encode_documents(tokenizer, generate_split("test", 200, seed=7), seq_len=128)
    accuracy = masked_token_accuracy(model, ids, is_text, 0.15, model.config.mask_token_id,
                                     torch.Generator().manual_seed(0))
    assert accuracy >= 0.4


def test_shipped_backbone_answers_held_out_problems_with_the_sampler_and_the_chunk_decoder():
    """Exact match on the first 100 test problems with LLaDA's sampler (one token per step, blocks of 16) and with
    the chunk decoder (block-causal, 16 rounds a chunk, the backbone alone): the rebuilt backbone is good both
    ways. The figures over 200 problems are in docs/embedded_default.md."""
    model = LLaDAModelLM.from_pretrained(TINY_LLADA_PATH).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLADA_PATH)
    prepared = prepare_dataset(DataArguments(num_synthetic_eval=100, max_samples=100), tokenizer, 16, "test")
    rows, _ = scored_rows(prepared.dataset)
    budget = default_new_token_budget(rows, 16)
    sampler = llada_sampler_accuracy(model, tokenizer, rows, budget, 16, batch_size=100, progress=False)
    chunked = chunk_decoder_accuracy(LLaDATRMHybrid(HybridConfig(chunk_size=16), backbone=model).eval(), tokenizer,
                                     rows, budget, enable_refinement=False, batch_size=100, progress=False,
                                     decode_steps_per_chunk=16)
    assert sampler["num_samples"] == chunked["num_samples"] == 100
    assert sampler["accuracy"] >= 0.40 and chunked["accuracy"] >= 0.40, (sampler["accuracy"], chunked["accuracy"])
