"""Decoding speed on one model: LLaDA `generate` against the chunk decoder `generate_with_refinement`.

    python benchmarks/bench_generate.py [--batch_size 4] [--new_tokens 64] [--repeats 3] [--device cpu] [--threads 1]

Same model (the shipped tiny backbone when its weights exist, else a random backbone of the same shape; a fresh
head with the default HybridConfig), same prompts (synthetic test questions), same number of new tokens:
- LLaDA `generate` with steps = new_tokens and block_length = chunk_size (one token per step, chunk by chunk);
- `generate_with_refinement` without the KV cache, with it, and with refinement off (cache on), all with
  `ignore_eos` so every row decodes exactly `new_tokens` tokens.
Each method runs once to warm up, then `--repeats` times; the table shows the fastest run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from transformers import AutoTokenizer

from llada_trm.pretrain import build_config
from llada_trm.pretrain import parse_args as pretrain_defaults
from llada_trm.data.layout import encode_prompt, render_prompt
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.embedded.assets import TINY_LLADA_PATH
from llada_trm.inference.chunk_decoding import RefinementOutput, generate_with_refinement
from llada_trm.inference.sampler import generate
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.modeling_llada import LLaDAModelLM


def build_model(tokenizer, device: str) -> tuple[LLaDATRMHybrid, str]:
    if (TINY_LLADA_PATH / "model.safetensors").exists():
        backbone, source = LLaDAModelLM.from_pretrained(TINY_LLADA_PATH), "tiny-llada (pretrained)"
    else:
        torch.manual_seed(0)
        backbone = LLaDAModelLM(build_config(tokenizer, pretrain_defaults([])))
        source = "random backbone of the tiny-llada shape (model.safetensors not found)"
    model = LLaDATRMHybrid(HybridConfig(), backbone=backbone.eval()).to(device).eval()
    return model, source


def build_prompts(tokenizer, batch_size: int) -> list[list[int]]:
    questions = [record["question"] for record in generate_split("test", batch_size)]
    return [encode_prompt(tokenizer, render_prompt(q)) for q in questions]


def llada_inputs(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def best_time(fn, repeats: int, device: str) -> tuple[float, object]:
    result = fn()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def mean_steps(output: RefinementOutput) -> float:
    entries = [entry for row in output.trace for entry in row]
    return sum(e.steps for e in entries) / len(entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=64, help="a multiple of the chunk size (16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; "
                        "1 gives steadier timings on a loaded machine)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(TINY_LLADA_PATH)
    model, source = build_model(tokenizer, args.device)
    chunk = model.config.chunk_size
    if args.new_tokens <= 0 or args.new_tokens % chunk:
        parser.error(f"--new_tokens must be a positive multiple of the chunk size ({chunk})")
    prompts = build_prompts(tokenizer, args.batch_size)
    prompt_ids, prompt_mask = llada_inputs(prompts, tokenizer.pad_token_id, args.device)
    n = args.new_tokens

    def chunk_decoder(**kwargs):
        return lambda: generate_with_refinement(model, prompts, max_new_tokens=n, ignore_eos=True, return_trace=True,
                                                **kwargs)

    methods = {
        f"LLaDA generate ({n} steps, block {chunk})": lambda: generate(
            model.backbone, prompt_ids, attention_mask=prompt_mask, steps=n, gen_length=n, block_length=chunk),
        "refinement, no cache": chunk_decoder(use_cache=False),
        "refinement, KV cache": chunk_decoder(use_cache=True),
        "backbone only, KV cache": chunk_decoder(use_cache=True, enable_refinement=False),
    }
    rows = []
    for name, fn in methods.items():
        seconds, output = best_time(fn, args.repeats, args.device)
        steps = None if isinstance(output, torch.Tensor) else mean_steps(output)
        rows.append((name, seconds, args.batch_size * n / seconds, steps))

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    config, backbone_config = model.config, model.backbone.config
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {args.device} {device_name}".rstrip())
    print(f"model: {source}; d_model {backbone_config.d_model}, {backbone_config.n_layers} layers; head "
          f"{config.head_layers} layers of width {config.head_hidden_size}, latent_steps {config.latent_steps}, "
          f"steps {config.min_recursive_steps}-{config.max_recursive_steps} at threshold "
          f"{config.refine_confidence_threshold}")
    lengths = [len(p) for p in prompts]
    print(f"batch {args.batch_size} x {n} new tokens, prompts {min(lengths)}-{max(lengths)} tokens, "
          f"best of {args.repeats}\n")
    baseline = rows[0][2]
    print(f"{'method':<34}{'seconds':>9}{'tokens/s':>11}{'vs LLaDA':>10}{'steps/chunk':>13}")
    for name, seconds, tokens_per_second, steps in rows:
        steps_text = f"{steps:.2f}" if steps is not None else "-"
        print(f"{name:<34}{seconds:>9.3f}{tokens_per_second:>11.1f}{tokens_per_second / baseline:>9.2f}x"
              f"{steps_text:>13}")


if __name__ == "__main__":
    main()
