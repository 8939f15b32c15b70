"""Build the embedded tiny LLaDA backbone: pretraining, then an instruct stage, both with LLaDA's objectives.

1. Pretraining on synthetic reasoning documents (t ~ U(0, 1), p_mask = (1 - 1e-3) t + 1e-3 on every token but
   BOS, loss = sum of CE / p_mask over masked tokens / (B * L)).
2. Instruct stage, as LLaDA-8B-Instruct was made: the same documents, the prompt never masked, the response
   (reasoning, EOS and the EOS fill) masked at one rate per sequence, loss = LLaDA SFT (CE / p_mask over the
   response length). Pretraining alone does not teach a small model to carry the question's quantities into
   the chain; conditioning on an always-visible prompt does.

3. Block stage, as BD3-LM and Fast-dLLM v2 adapt their models to blocks: steps alternate between LLaDA SFT with
   full attention over a response EOS-filled to a random length (so the sampler is stable across budgets) and
   clean-context block diffusion on the training layout (`training.diffusion.clean_context_inputs`: each
   reasoning chunk masked at its own rate, predicted against the prompt and the clean chunks before it, the
   attention the chunk decoder and the hybrid run the backbone in).

It then reports masked-token accuracy at mask rate 0.15 and exact match on held-out test problems with LLaDA's
sampler (one token per step, blocks of 16, at several new-token budgets) and with the chunk decoder, and saves the model in the official layout (config.json +
model.safetensors, bf16 storage with `--save_dtype bfloat16`) next to the tokenizer. `--init_from DIR` starts
from a saved backbone and its tokenizer (then `--steps 0 --instruct_steps 0` runs the block stage alone); how the
shipped model was built is in docs/embedded_default.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from llada_trm.data.collator import pad_batch
from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.data.layout import ANSWER_CLOSE, ANSWER_OPEN, render_example, render_prompt
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.embedded.assets import TINY_LLADA_PATH
from llada_trm.embedded.tokenizer import train_tokenizer
from llada_trm.inference.exact_match import (
    chunk_decoder_accuracy,
    default_new_token_budget,
    llada_sampler_accuracy,
    prompt_ids_of,
    scored_rows,
)
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.configuration_llada import LLaDAConfig
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.loading import load_tokenizer
from llada_trm.model.modeling_llada import LLaDAModelLM
from llada_trm.training.diffusion import (
    clean_context_inputs,
    forward_mask,
    llada_pretrain_loss,
    llada_sft_loss,
    masked_token_accuracy,
)

CHUNK_SIZE = 16
BUDGETS = (64, 96, 128, 160)  # new-token budgets the sampler is reported at (it should not depend on them)


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
    parser.add_argument("--block_steps", type=int, default=0, help="block-stage steps (0 = none)")
    parser.add_argument("--block_learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_response", type=int, default=176,
                        help="block stage: full-attention responses are EOS-filled to a random length up to this")
    parser.add_argument("--init_from", default=None, help="start from this saved backbone and its tokenizer")
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--n_layers", type=int, default=6)
    parser.add_argument("--mlp_hidden_size", type=int, default=384)
    parser.add_argument("--save_dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_train", "num_eval", "batch_size", "seq_len", "max_response"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("steps", "instruct_steps", "block_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be non-negative, got {getattr(args, name)}")
    if args.steps == 0 and args.init_from is None:
        parser.error("--steps must be positive unless --init_from gives a pretrained backbone")
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


def run_steps(model, name: str, steps: int, learning_rate: float, args, loss_at) -> None:
    """`steps` AdamW steps (cosine schedule with warmup) on the loss `loss_at(step)` returns."""
    if steps == 0:
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, min(args.warmup_steps, steps)))
    start = time.time()
    model.train()
    for step in range(steps):
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"{name} step {step:5d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)
    model.eval()


def train_stage(model, name: str, ids: torch.Tensor, eligible: torch.Tensor, instruct: bool, steps: int,
                learning_rate: float, args, generators: tuple[torch.Generator, torch.Generator]) -> None:
    """Pretraining or instruct steps on random batches of `ids`; masks drawn over `eligible` positions (B, L).

    generators: (CPU generator for the batch rows, generator on the device for the masks).
    """
    batch_generator, mask_generator = generators
    mask_id = model.config.mask_token_id

    def loss_at(step: int) -> torch.Tensor:
        rows = torch.randint(len(ids), (args.batch_size,), generator=batch_generator)
        batch, batch_eligible = ids[rows].to(args.device), eligible[rows].to(args.device)
        noisy, is_masked, p_mask = forward_mask(batch, batch_eligible, mask_id, mask_generator)
        logits = model(input_ids=noisy).logits
        if instruct:
            return llada_sft_loss(logits, batch, is_masked, p_mask, batch_eligible)
        return llada_pretrain_loss(logits, batch, is_masked, p_mask)

    run_steps(model, name, steps, learning_rate, args, loss_at)


def full_attention_batch(rows: list[dict], eos_id: int, max_response: int, generator: torch.Generator) -> dict:
    """Prompt, then the reasoning (EOS fill included) EOS-filled to a random length in [its length, max_response];
    right-padded. Returns input_ids, attention_mask and is_response (B, L)."""
    sequences, responses = [], []
    for row in rows:
        prompt = prompt_ids_of(row)
        reasoning = [label for label in row["labels"] if label != -100]
        longest = max(len(reasoning), max_response)
        length = int(torch.randint(len(reasoning), longest + 1, (1,), generator=generator))
        sequences.append(prompt + reasoning + [eos_id] * (length - len(reasoning)))
        responses.append([False] * len(prompt) + [True] * length)
    width = max(map(len, sequences))
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    return dict(
        input_ids=torch.tensor([sequence + [eos_id] * (width - len(sequence)) for sequence in sequences]),
        attention_mask=(torch.arange(width)[None, :] < lengths[:, None]).long(),
        is_response=torch.tensor([response + [False] * (width - len(response)) for response in responses]),
    )


def block_stage(model, layout_rows: list[dict], eos_id: int, args,
                generators: tuple[torch.Generator, torch.Generator]) -> None:
    """Steps alternate between full-attention LLaDA SFT over variable-length responses and clean-context block
    diffusion on the training layout (module docstring, stage 3)."""
    batch_generator, mask_generator = generators
    mask_id = model.config.mask_token_id

    def loss_at(step: int) -> torch.Tensor:
        picked = torch.randint(len(layout_rows), (args.batch_size,), generator=batch_generator).tolist()
        rows = [layout_rows[i] for i in picked]
        if step % 2 == 0:
            batch = {k: v.to(args.device) for k, v in full_attention_batch(rows, eos_id, args.max_response,
                                                                            batch_generator).items()}
            noisy, is_masked, p_mask = forward_mask(batch["input_ids"], batch["is_response"], mask_id, mask_generator)
            logits = model(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
            return llada_sft_loss(logits, batch["input_ids"], is_masked, p_mask, batch["is_response"])
        batch = {k: v.to(args.device) for k, v in pad_batch(rows, eos_id, CHUNK_SIZE).items()}
        is_response = batch["labels"] != -100
        targets = batch["labels"].where(is_response, batch["input_ids"])
        inputs, is_masked, p_mask = clean_context_inputs(targets, batch["attention_mask"], batch["chunk_index"],
                                                         is_response, mask_id, mask_generator)
        logits = model(**inputs).logits[:, targets.shape[1]:]
        return llada_sft_loss(logits, targets, is_masked, p_mask, is_response)

    run_steps(model, "block", args.block_steps, args.block_learning_rate, args, loss_at)


def held_out_exact_match(model, tokenizer, num_eval: int) -> dict:
    """Exact match on the first `num_eval` test problems of the data pipeline: LLaDA's sampler (one token per
    step, blocks of 16) at the default budget and at each of BUDGETS, and the chunk decoder (16 rounds a chunk)."""
    prepared = prepare_dataset(DataArguments(num_synthetic_eval=num_eval, max_samples=num_eval), tokenizer,
                               CHUNK_SIZE, "test")
    rows, _ = scored_rows(prepared.dataset)
    budget = default_new_token_budget(rows, CHUNK_SIZE)
    report = {"exact_match_problems": len(rows), "default_budget": budget}
    for tokens in (budget, *BUDGETS):
        result = llada_sampler_accuracy(model, tokenizer, rows, tokens, CHUNK_SIZE, batch_size=64, progress=False)
        report[f"exact_match_llada_sampler@{tokens}"] = round(result["accuracy"], 4)
    chunked = LLaDATRMHybrid(HybridConfig(chunk_size=CHUNK_SIZE, head_hidden_size=16, head_heads=1), model).eval()
    result = chunk_decoder_accuracy(chunked, tokenizer, rows, budget, enable_refinement=False, batch_size=64,
                                    progress=False, decode_steps_per_chunk=CHUNK_SIZE)
    report["exact_match_chunk_decoder_16_rounds"] = round(result["accuracy"], 4)
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    began = time.time()
    train_records = generate_split("train", args.num_train, seed=args.seed)
    eval_records = generate_split("test", args.num_eval, seed=args.seed)
    if args.init_from:
        model = LLaDAModelLM.from_pretrained(args.init_from).to(args.device)
        tokenizer = load_tokenizer(args.init_from)
    else:
        texts = (render_example(**r) for r in train_records)
        tokenizer = train_tokenizer(texts, whole_tokens=(ANSWER_OPEN, ANSWER_CLOSE))
        model = LLaDAModelLM(build_config(tokenizer, args)).to(args.device)
    train_ids, _, train_is_response = encode_documents(tokenizer, train_records, args.seq_len)
    eval_ids, eval_is_text, _ = encode_documents(tokenizer, eval_records, args.seq_len)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_ids)} training documents "
          f"of {len(train_records)}")

    generators = (torch.Generator().manual_seed(args.seed), torch.Generator(device=args.device).manual_seed(args.seed + 1))
    not_bos = torch.ones_like(train_ids, dtype=torch.bool)
    not_bos[:, 0] = False
    train_stage(model, "pretrain", train_ids, not_bos, False, args.steps, args.learning_rate, args, generators)
    train_stage(model, "instruct", train_ids, train_is_response, True, args.instruct_steps,
                args.instruct_learning_rate, args, generators)
    if args.block_steps:
        layout = prepare_dataset(DataArguments(num_synthetic_train=args.num_train), tokenizer, CHUNK_SIZE, "train")
        block_stage(model, layout.dataset.to_list(), tokenizer.eos_token_id, args, generators)
    train_seconds = time.time() - began

    accuracy = masked_token_accuracy(model, eval_ids.to(args.device), eval_is_text.to(args.device), 0.15,
                                     model.config.mask_token_id, torch.Generator(device=args.device).manual_seed(1234))
    model.cpu()
    exact_match = held_out_exact_match(model, tokenizer, args.num_eval)
    print(f"held-out masked-token accuracy at mask rate 0.15: {accuracy:.3f}")
    for name, value in exact_match.items():
        print(f"held-out {name}: {value}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, args.save_dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "masked_token_accuracy@0.15": round(accuracy, 4),
        **exact_match,
        "args": vars(args),
        "train_seconds": round(train_seconds),
        "seconds": round(time.time() - began),
        "torch": torch.__version__,
    }
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
