"""Build the embedded tiny LLaDA backbone: pretraining, then an instruct stage, both with LLaDA's objectives.

1. Pretraining on synthetic reasoning documents (t ~ U(0, 1), p_mask = (1 - 1e-3) t + 1e-3 on every token but
   BOS, loss = sum of CE / p_mask over masked tokens / (B * L)).
2. Instruct stage, as LLaDA-8B-Instruct was made: the same documents, the prompt never masked, the response
   (reasoning, EOS and the EOS fill) masked at one rate per sequence, loss = LLaDA SFT (CE / p_mask over the
   response length). Pretraining alone does not teach a small model to carry the question's quantities into
   the chain; conditioning on an always-visible prompt does.

It then reports masked-token accuracy at mask rate 0.15 and exact match with LLaDA's sampler (one token per
step, blocks of 16) on held-out test problems, and saves the model in the official layout (config.json +
model.safetensors, bf16 storage with `--save_dtype bfloat16`) next to the tokenizer. The shipped model was built
with the defaults:

    python -m llada_trm.pretrain --output_dir llada_trm/embedded/assets/tiny-llada
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.data.layout import render_example, render_prompt
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.embedded.assets import TINY_LLADA_PATH
from llada_trm.embedded.tokenizer import train_tokenizer
from llada_trm.inference.exact_match import default_new_token_budget, llada_sampler_accuracy, scored_rows
from llada_trm.model.configuration_llada import LLaDAConfig
from llada_trm.model.modeling_llada import LLaDAModelLM
from llada_trm.training.diffusion import forward_mask, llada_pretrain_loss, llada_sft_loss, masked_token_accuracy

CHUNK_SIZE = 16


def encode_documents(tokenizer, records: list[dict], seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BOS + text + EOS, EOS-filled to `seq_len` (longer documents are dropped).

    Returns ids (D, seq_len), is_text (the text tokens, for masked-token accuracy) and is_response (everything
    after the prompt: reasoning, EOS and the EOS fill, the part the instruct stage masks).
    """
    rows, is_text, is_response = [], [], []
    for record in records:
        ids = tokenizer(render_example(**record), add_special_tokens=False)["input_ids"]
        prompt_length = 1 + len(tokenizer(render_prompt(record["question"]), add_special_tokens=False)["input_ids"])
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        if len(ids) > seq_len:
            continue
        rows.append(ids + [tokenizer.eos_token_id] * (seq_len - len(ids)))
        is_text.append([False] + [True] * (len(ids) - 2) + [False] * (seq_len - len(ids) + 1))
        is_response.append([False] * prompt_length + [True] * (seq_len - prompt_length))
    return torch.tensor(rows), torch.tensor(is_text), torch.tensor(is_response)


def build_config(tokenizer, args) -> LLaDAConfig:
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    return LLaDAConfig(
        d_model=args.d_model,
        n_heads=args.n_heads,
        n_kv_heads=args.n_heads,
        n_layers=args.n_layers,
        mlp_hidden_size=args.mlp_hidden_size,
        vocab_size=vocab,
        embedding_size=vocab,
        max_sequence_length=1024,
        rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        mask_token_id=tokenizer.mask_token_id,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(TINY_LLADA_PATH))
    parser.add_argument("--num_train", type=int, default=20000)
    parser.add_argument("--num_eval", type=int, default=200, help="held-out test problems for both reports")
    parser.add_argument("--steps", type=int, default=500, help="pretraining steps")
    parser.add_argument("--instruct_steps", type=int, default=7000, help="instruct-stage steps (0 = none)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--instruct_learning_rate", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--n_layers", type=int, default=6)
    parser.add_argument("--mlp_hidden_size", type=int, default=384)
    parser.add_argument("--save_dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_train", "num_eval", "steps", "batch_size", "seq_len"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.instruct_steps < 0:
        parser.error(f"--instruct_steps must be non-negative, got {args.instruct_steps}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch build sees no CUDA device")
    return args


def cosine_with_warmup(steps: int, warmup_steps: int):
    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return lr_at


def train_stage(model, name: str, ids: torch.Tensor, eligible: torch.Tensor, instruct: bool, steps: int,
                learning_rate: float, args, generators: tuple[torch.Generator, torch.Generator]) -> None:
    """`steps` AdamW steps on random batches of `ids`; masks drawn over `eligible` positions (B, L).

    generators: (CPU generator for the batch rows, generator on the device for the masks).
    """
    batch_generator, mask_generator = generators
    if steps == 0:
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, min(args.warmup_steps, steps)))
    mask_id = model.config.mask_token_id
    start = time.time()
    model.train()
    for step in range(steps):
        rows = torch.randint(len(ids), (args.batch_size,), generator=batch_generator)
        batch, batch_eligible = ids[rows].to(args.device), eligible[rows].to(args.device)
        noisy, is_masked, p_mask = forward_mask(batch, batch_eligible, mask_id, mask_generator)
        logits = model(input_ids=noisy).logits
        if instruct:
            loss = llada_sft_loss(logits, batch, is_masked, p_mask, batch_eligible)
        else:
            loss = llada_pretrain_loss(logits, batch, is_masked, p_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"{name} step {step:5d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)
    model.eval()


def held_out_exact_match(model, tokenizer, num_eval: int) -> tuple[float, int]:
    """Exact match with LLaDA's sampler on the first `num_eval` test problems of the data pipeline."""
    prepared = prepare_dataset(DataArguments(num_synthetic_eval=num_eval, max_samples=num_eval), tokenizer,
                               CHUNK_SIZE, "test")
    rows, _ = scored_rows(prepared.dataset)
    result = llada_sampler_accuracy(model, tokenizer, rows, default_new_token_budget(rows, CHUNK_SIZE), CHUNK_SIZE,
                                    batch_size=64, progress=False)
    return result["accuracy"], result["num_samples"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    began = time.time()
    train_records = generate_split("train", args.num_train, seed=args.seed)
    eval_records = generate_split("test", args.num_eval, seed=args.seed)
    tokenizer = train_tokenizer(render_example(**r) for r in train_records)
    train_ids, _, train_is_response = encode_documents(tokenizer, train_records, args.seq_len)
    eval_ids, eval_is_text, _ = encode_documents(tokenizer, eval_records, args.seq_len)
    config = build_config(tokenizer, args)
    model = LLaDAModelLM(config).to(args.device)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_ids)} training documents "
          f"of {len(train_records)}")

    generators = (torch.Generator().manual_seed(args.seed), torch.Generator(device=args.device).manual_seed(args.seed + 1))
    not_bos = torch.ones_like(train_ids, dtype=torch.bool)
    not_bos[:, 0] = False
    train_stage(model, "pretrain", train_ids, not_bos, False, args.steps, args.learning_rate, args, generators)
    train_stage(model, "instruct", train_ids, train_is_response, True, args.instruct_steps,
                args.instruct_learning_rate, args, generators)
    train_seconds = time.time() - began

    accuracy = masked_token_accuracy(model, eval_ids.to(args.device), eval_is_text.to(args.device), 0.15,
                                     config.mask_token_id, torch.Generator(device=args.device).manual_seed(1234))
    model.cpu()
    exact_match, num_scored = held_out_exact_match(model, tokenizer, args.num_eval)
    print(f"held-out masked-token accuracy at mask rate 0.15: {accuracy:.3f}")
    print(f"held-out exact match with the LLaDA sampler ({num_scored} test problems): {exact_match:.3f}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, args.save_dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "masked_token_accuracy@0.15": round(accuracy, 4),
        "exact_match_llada_sampler": round(exact_match, 4),
        "exact_match_problems": num_scored,
        "args": vars(args),
        "train_seconds": round(train_seconds),
        "seconds": round(time.time() - began),
        "torch": torch.__version__,
    }
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
