"""Pretrain the embedded tiny LLaDA backbone on synthetic reasoning text with the LLaDA objective.

Builds the domain tokenizer, trains a small `LLaDAModelLM` with masked diffusion (t ~ U(0, 1),
p_mask = (1 - 1e-3) t + 1e-3, loss = sum of CE / p_mask over masked tokens / (B * L)), reports masked-token
accuracy on held-out (test-split) problems at mask rate 0.15, and saves everything in the official layout
(config.json + model.safetensors) next to the tokenizer. The shipped model was built with the defaults:

    python -m llada_trm.pretrain --output_dir llada_trm/assets/tiny-llada
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from .configuration_llada import LLaDAConfig
from .defaults import TINY_LLADA_PATH
from .diffusion import forward_mask, llada_pretrain_loss, masked_token_accuracy
from .layout import render_example
from .modeling_llada import LLaDAModelLM
from .synthetic import generate_split
from .tokenizer import train_tokenizer


def encode_documents(tokenizer, records: list[dict], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + text + EOS, EOS-filled to `seq_len` (longer documents are dropped). Returns ids and is_text."""
    rows, is_text = [], []
    for record in records:
        ids = tokenizer(render_example(**record), add_special_tokens=False)["input_ids"]
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        if len(ids) > seq_len:
            continue
        rows.append(ids + [tokenizer.eos_token_id] * (seq_len - len(ids)))
        is_text.append([False] + [True] * (len(ids) - 2) + [False] * (seq_len - len(ids) + 1))
    return torch.tensor(rows), torch.tensor(is_text)


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
    parser.add_argument("--num_eval", type=int, default=500)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=160)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--mlp_hidden_size", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_train", "num_eval", "steps", "batch_size", "seq_len"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train_records = generate_split("train", args.num_train, seed=args.seed)
    eval_records = generate_split("test", args.num_eval, seed=args.seed)
    tokenizer = train_tokenizer(render_example(**r) for r in train_records)
    train_ids, _ = encode_documents(tokenizer, train_records, args.seq_len)
    eval_ids, eval_is_text = encode_documents(tokenizer, eval_records, args.seq_len)
    config = build_config(tokenizer, args)
    model = LLaDAModelLM(config)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_ids)} training documents")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(args.seed)
    eligible = torch.ones(args.batch_size, args.seq_len, dtype=torch.bool)
    eligible[:, 0] = False  # BOS stays visible
    start = time.time()
    model.train()
    for step in range(args.steps):
        batch = train_ids[torch.randint(len(train_ids), (args.batch_size,), generator=generator)]
        noisy, is_masked, p_mask = forward_mask(batch, eligible, config.mask_token_id, generator)
        loss = llada_pretrain_loss(model(input_ids=noisy).logits, batch, is_masked, p_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}  {time.time() - start:.0f}s")

    model.eval()
    accuracy = masked_token_accuracy(
        model, eval_ids, eval_is_text, 0.15, config.mask_token_id, torch.Generator().manual_seed(1234)
    )
    print(f"held-out masked-token accuracy at mask rate 0.15: {accuracy:.3f}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"masked_token_accuracy@0.15": round(accuracy, 4), "args": vars(args), "seconds": round(time.time() - start)}
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
