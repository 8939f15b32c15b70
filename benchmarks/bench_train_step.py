"""Training-step cost on one model and one batch: vectorised deep supervision vs the naive per-chunk loop.

    python benchmarks/bench_train_step.py [--model tiny-llada] [--batch_size 8] [--chunk_size 16]
        [--max_recursive_steps 8] [--num_chunks K] [--max_length 512] [--repeats 5] [--warmup 1]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--threads 1]

Variants, all on the same batch (synthetic train problems through prepare_dataset and ChunkMaskingCollator):
- (a) vectorised: `LLaDATRMHybrid.forward` over all chunks and all `max_recursive_steps` steps in one
  block-causal pass, its deep-supervision loss, backward, AdamW on the head (backbone frozen);
- (b) naive loop: for each chunk i, backbone and head on [prompt, chunks 0..i] only, loss on chunk i,
  backward (gradients accumulate over chunks), one AdamW step at the end;
- (c) full fine-tuning of the backbone alone with plain LLaDA SFT (forward_mask on the response tokens,
  llada_sft_loss, backward, AdamW on every backbone parameter).
The variants and the breakdown's pieces run interleaved, one of each per round: `--warmup` untimed rounds,
then `--repeats` timed ones; tables show medians. On CPU the process CPU time is shown next to wall time:
on a machine shared with other jobs it is the steadier of the two. `--threads` defaults to 1 for the same reason.
Breakdown of the vectorised step: backbone forward (no grad), head forward + backward (with the step logits
and CE at supervised positions), AdamW on the head, "other" = the rest (masks, output assembly, loss,
metrics), and the collator call that builds the batch from prepared samples before the step.
Before timing, the losses of (a) and (b) are compared (the two compute the same loss), and the memory each
variant's forward keeps for backward is measured with saved-tensor hooks ("saved MiB"; for (b) its largest
chunk pass). On CUDA the table also shows each variant's peak memory above what was resident.
(c) trains a copy of the backbone, so a large `--model` needs memory for two backbones.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import datasets
import torch
from timing import SavedTensorMeter, Timing, describe_machine, interleaved_times  # benchmarks/timing.py
from transformers import AutoTokenizer

from llada_trm.pretrain import build_config
from llada_trm.pretrain import parse_args as pretrain_defaults
from llada_trm.data.collator import ChunkMaskingCollator
from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.embedded.assets import TINY_LLADA_PATH, resolve_backbone_path
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.configuration_llada import LLaDAConfig
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.modeling_llada import LLaDAModelLM
from llada_trm.training.diffusion import forward_mask, llada_sft_loss
from llada_trm.model.losses import chunk_token_weights, deep_supervision_loss, step_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BATCH_KEYS = ("input_ids", "attention_mask", "chunk_index", "labels", "chunk_is_masked")


# ---------------------------------------------------------------------------------------------- setup

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llada", help="backbone: tiny-llada (shipped) or a local path")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--chunk_size", type=int, default=16)
    parser.add_argument("--max_recursive_steps", type=int, default=8)
    parser.add_argument("--num_chunks", type=int, default=None,
                        help="use samples with at least this many reasoning chunks, cut to exactly this many "
                             "(default: the first --batch_size samples as they come)")
    parser.add_argument("--max_length", type=int, default=512, help="sample length cap in tokens (prepare_dataset)")
    parser.add_argument("--mask_probability", type=float, default=0.3)
    parser.add_argument("--no_detach_between_steps", action="store_true",
                        help="keep y and z attached across refinement steps")
    parser.add_argument("--checkpoint_refinement_steps", choices=("auto", "on", "off"), default="auto",
                        help="recompute each refinement step in backward (auto: on when detaching between steps)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps timings stable on a shared machine, where several threads "
                             "per process stall each other; raise it on an idle machine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("batch_size", "chunk_size", "max_recursive_steps", "repeats", "max_length", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 0 or (args.num_chunks is not None and args.num_chunks <= 0):
        parser.error("--warmup must be >= 0 and --num_chunks positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def load_backbone(name: str, tokenizer) -> tuple[LLaDAModelLM, str]:
    """Pretrained weights when they exist; else a random model of the config found there, or the built-in one."""
    path = Path(resolve_backbone_path(name))
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return LLaDAModelLM.from_pretrained(path), f"{name} (pretrained weights from {path})"
    torch.manual_seed(0)
    if (path / "config.json").exists():
        config = LLaDAConfig.from_pretrained(path)
        return LLaDAModelLM(config), f"RANDOM weights with {path / 'config.json'} (no model.safetensors there)"
    config = build_config(tokenizer, pretrain_defaults([]))
    return LLaDAModelLM(config), (f"RANDOM weights with the built-in tiny-llada shape (neither model.safetensors "
                                  f"nor config.json in {path})")


def build_hybrid(backbone: LLaDAModelLM, args: argparse.Namespace) -> LLaDATRMHybrid:
    config = HybridConfig(
        chunk_size=args.chunk_size, max_recursive_steps=args.max_recursive_steps,
        min_recursive_steps=min(2, args.max_recursive_steps),
        detach_between_steps=not args.no_detach_between_steps,
        checkpoint_refinement_steps={"auto": None, "on": True, "off": False}[args.checkpoint_refinement_steps],
    )
    model = LLaDATRMHybrid(config, backbone=backbone)
    # out_proj starts at zero, which hides the head from the logits; a trained-looking head makes the
    # loss check below test the head too (the cost of a step does not depend on the values).
    torch.nn.init.normal_(model.head.out_proj.weight, std=0.02)
    return model


def cut_to_chunks(sample: dict, num_chunks: int, chunk_size: int) -> dict:
    """A prepared sample keeping only its first `num_chunks` reasoning chunks."""
    keep = sum(1 for c in sample["chunk_index"] if c < 0) + num_chunks * chunk_size
    cut = {k: list(sample[k][:keep]) for k in ("input_ids", "attention_mask", "labels", "chunk_index")}
    return dict(sample, **cut, num_chunks=num_chunks)


def prepared_features(tokenizer, args: argparse.Namespace) -> list[dict]:
    """`--batch_size` prepared samples of the synthetic train split (cut to `--num_chunks` when given)."""
    data_args = DataArguments(dataset_name="synthetic", eval_split=None, max_length=args.max_length,
                              num_synthetic_train=max(64, 16 * args.batch_size))
    dataset = prepare_dataset(data_args, tokenizer, args.chunk_size, "train").dataset
    samples = [dataset[i] for i in range(len(dataset))]
    if args.num_chunks is None:
        return samples[: args.batch_size]
    long_enough = [s for s in samples if s["num_chunks"] >= args.num_chunks]
    if len(long_enough) < args.batch_size:
        most = max(s["num_chunks"] for s in samples)
        raise SystemExit(f"only {len(long_enough)} samples have {args.num_chunks} chunks of {args.chunk_size} "
                         f"(the longest has {most}); lower --num_chunks or --chunk_size")
    return [cut_to_chunks(s, args.num_chunks, args.chunk_size) for s in long_enough[: args.batch_size]]


def to_device(batch: dict, device: str) -> dict:
    return {k: batch[k].to(device) for k in BATCH_KEYS}


# ------------------------------------------------------------------------------------------ variants

def vectorised_step(model: LLaDATRMHybrid, optimizer: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    """(a) One pass over every chunk and every refinement step, loss, backward, AdamW on the head."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def chunk_prefix(batch: dict, chunk: int, pad_token_id: int) -> dict | None:
    """The rows that have reasoning chunk `chunk`, each cut right after it: [prompt, chunks 0..chunk].

    Rows are right-padded to the longest cut (pad id, attention 0, chunk_index -1); labels are kept on chunk
    `chunk` only, so the loss of this piece is the loss of that chunk. None when no row has the chunk.
    """
    chunk_index = batch["chunk_index"]
    here = chunk_index == chunk
    rows = here.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    positions = torch.arange(chunk_index.shape[1], device=chunk_index.device)
    ends = (here[rows] * (positions + 1)).amax(dim=1)  # one past the chunk's last position, per row
    width = int(ends.max())
    beyond = positions[:width] >= ends[:, None]
    piece_chunks = chunk_index[rows, :width].masked_fill(beyond, -1)
    return {
        "input_ids": batch["input_ids"][rows, :width].masked_fill(beyond, pad_token_id),
        "attention_mask": batch["attention_mask"][rows, :width].masked_fill(beyond, 0),
        "chunk_index": piece_chunks,
        "labels": batch["labels"][rows, :width].masked_fill(piece_chunks != chunk, -100),
        "chunk_is_masked": batch["chunk_is_masked"][rows, : chunk + 1],
    }


def supervised_weight_sum(batch: dict, config: HybridConfig) -> torch.Tensor:
    """N = sum of c_t over the whole batch's supervised tokens (the vectorised loss's normaliser)."""
    weights = chunk_token_weights(batch["chunk_index"], batch["chunk_is_masked"], config.deep_supervision_weight,
                                  config.unmasked_chunk_weight)
    return (weights * (batch["labels"] != -100)).sum()


def naive_loss(model: LLaDATRMHybrid, batch: dict, pad_token_id: int, backward: bool) -> torch.Tensor:
    """(b)'s loss: for each chunk i, backbone + head on [prompt, chunks 0..i], the loss of chunk i (over the whole
    batch's normaliser, so the sum over chunks is (a)'s loss); with `backward`, gradients accumulate per chunk."""
    normaliser = supervised_weight_sum(batch, model.config)
    total = torch.zeros((), device=batch["input_ids"].device)
    for chunk in range(int(batch["chunk_index"].max()) + 1):
        piece = chunk_prefix(batch, chunk, pad_token_id)
        if piece is None:
            continue
        out = model(**piece)
        loss_sum, _ = deep_supervision_loss(out.step_token_loss, out.chunk_weight, normalizer=1.0,
                                            step_weighting=model.config.step_weighting)
        loss = loss_sum / normaliser
        if backward:
            loss.backward()
        total += loss.detach()
    return total


def naive_step(model: LLaDATRMHybrid, optimizer: torch.optim.Optimizer, batch: dict, pad_token_id: int) -> torch.Tensor:
    """(b) The naive loop's losses and per-chunk backward, then one AdamW step on the head."""
    optimizer.zero_grad(set_to_none=True)
    total = naive_loss(model, batch, pad_token_id, backward=True)
    optimizer.step()
    return total


def naive_positions(batch: dict, pad_token_id: int) -> int:
    """Token positions (padding included) the naive loop runs through, summed over its chunk passes."""
    pieces = (chunk_prefix(batch, c, pad_token_id) for c in range(int(batch["chunk_index"].max()) + 1))
    return sum(p["input_ids"].numel() for p in pieces if p is not None)


def saved_for_backward(model: LLaDATRMHybrid, sft_backbone: LLaDAModelLM, batch: dict, pad_token_id: int,
                       generator: torch.Generator) -> dict[str, float]:
    """MiB saved for backward by one forward of each variant; for (b) the largest chunk pass (each pass runs its
    backward before the next one starts)."""
    with SavedTensorMeter(model) as vectorised:
        model(**batch).loss
    naive = []
    for chunk in range(int(batch["chunk_index"].max()) + 1):
        piece = chunk_prefix(batch, chunk, pad_token_id)
        if piece is not None:
            with SavedTensorMeter(model) as meter:
                model(**piece).loss
            naive.append(meter.mib)
    with SavedTensorMeter(sft_backbone) as sft:
        is_response = batch["labels"] != -100
        targets = batch["labels"].where(is_response, batch["input_ids"])
        noisy, is_masked, p_mask = forward_mask(targets, is_response, sft_backbone.config.mask_token_id, generator)
        logits = sft_backbone(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
        llada_sft_loss(logits, targets, is_masked, p_mask, is_response)
    return {"a": vectorised.mib, "b": max(naive), "c": sft.mib}


def sft_step(
    backbone: LLaDAModelLM, optimizer: torch.optim.Optimizer, batch: dict, generator: torch.Generator
) -> torch.Tensor:
    """(c) Plain LLaDA SFT of the backbone alone (docs/architecture.md §7): response tokens masked at a per-sequence rate."""
    optimizer.zero_grad(set_to_none=True)
    is_response = batch["labels"] != -100
    targets = batch["labels"].where(is_response, batch["input_ids"])
    noisy, is_masked, p_mask = forward_mask(targets, is_response, backbone.config.mask_token_id, generator)
    logits = backbone(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
    loss = llada_sft_loss(logits, targets, is_masked, p_mask, is_response)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------------------- breakdown

def backbone_forward(model: LLaDATRMHybrid, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.backbone_hidden_states(batch["input_ids"], batch["attention_mask"], batch["chunk_index"])


def head_forward_backward(model: LLaDATRMHybrid, hidden: torch.Tensor, batch: dict) -> None:
    """The head's share of a step: every refinement step, the step logits and CE at supervised positions (the
    library's `refine_supervised`), the weighted sum and backward. No output assembly, metrics or optimizer."""
    config = model.config
    supervised = batch["labels"] != -100
    per_step = model.refine_supervised(hidden, batch["attention_mask"], batch["chunk_index"], supervised,
                                       batch["labels"][supervised],
                                       draft_at=model.draft_positions(batch["input_ids"]))
    coefficient = chunk_token_weights(batch["chunk_index"], batch["chunk_is_masked"], config.deep_supervision_weight,
                                      config.unmasked_chunk_weight)[supervised]
    a = step_weights(config.max_recursive_steps, config.step_weighting, hidden.device)
    total = sum(a[s] * (step.ce * coefficient).sum() for s, step in enumerate(per_step))
    (total / a.sum() / coefficient.sum().clamp(min=1)).backward()


# ----------------------------------------------------------------------------------------------- main

def print_table(rows: list[tuple[str, Timing, float]], real_tokens: int, device: str) -> None:
    """Wall-clock columns; on CPU also the process CPU time, steadier than wall time on a shared machine; the
    MiB saved for backward; on CUDA the peak memory above what was resident."""
    on_cpu, reference = device == "cpu", rows[0][1]
    header = f"{'variant':<44}{'ms/step':>10}{'tokens/s':>10}{'vs (a)':>8}"
    header += f"{'CPU ms':>10}{'vs (a)':>8}" if on_cpu else ""
    print(header + f"{'saved MiB':>11}" + ("" if on_cpu else f"{'peak MiB':>10}"))
    for name, timing, saved_mib in rows:
        wall = timing.median("wall")
        line = f"{name:<44}{wall:>10.1f}{real_tokens / (wall / 1000):>10.0f}{wall / reference.median('wall'):>7.2f}x"
        if on_cpu:
            cpu = timing.median("cpu")
            line += f"{cpu:>10.1f}{cpu / reference.median('cpu'):>7.2f}x"
        line += f"{saved_mib:>11.1f}"
        if timing.peak_mib is not None:
            line += f"{timing.peak_mib:>10.0f}"
        print(line)


def print_breakdown(parts: list[tuple[str, dict[str, float]]], device: str) -> None:
    """parts: (name, {clock: ms}); the first part is the whole step, the shares are relative to it."""
    clocks = ("wall", "cpu") if device == "cpu" else ("wall",)
    step = parts[0][1]
    header = f"{'vectorised step (a) and its parts':<56}" + "".join(f"{c + ' ms':>10}{'share':>8}" for c in clocks)
    print(header)
    for name, values in parts:
        print(f"{name:<56}" + "".join(f"{values[c]:>10.1f}{values[c] / step[c]:>8.1%}" for c in clocks))


def per_round_other(timings: dict[str, Timing], clock: str) -> list[float]:
    """Per timed round: step (a) minus its separately timed backbone, head and optimizer pieces."""
    def times(name: str) -> list[float]:
        return timings[name].wall_ms if clock == "wall" else timings[name].cpu_ms

    pieces = zip(times("a"), times("backbone"), times("head"), times("optimizer"))
    return [step - backbone - head - optimizer for step, backbone, head, optimizer in pieces]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(TINY_LLADA_PATH)
    backbone, source = load_backbone(args.model, tokenizer)
    model = build_hybrid(backbone, args).to(device=device, dtype=dtype).train()
    mask_id, pad_id = model.backbone.config.mask_token_id, tokenizer.pad_token_id
    features = prepared_features(tokenizer, args)
    collator = ChunkMaskingCollator(mask_id, pad_id, args.chunk_size, args.mask_probability, seed=args.seed)
    batch = to_device(collator(features), device)

    real_tokens = int(batch["attention_mask"].sum())
    chunks = [int(c) + 1 for c in batch["chunk_index"].amax(dim=1)]
    parts = model.num_parameters_by_part()
    print(describe_machine(args))
    print(f"model: {source}")
    print(f"  backbone d_model {backbone.config.d_model}, {backbone.config.n_layers} layers, vocab "
          f"{backbone.config.vocab_size}, {parts['backbone'] / 1e6:.2f}M params; head width "
          f"{model.config.head_hidden_size}, {model.config.head_layers} layers, latent_steps "
          f"{model.config.latent_steps}, {parts['head'] / 1e6:.2f}M params")
    print(f"  max_recursive_steps {args.max_recursive_steps}, detach_between_steps "
          f"{model.config.detach_between_steps}, checkpoint_refinement_steps "
          f"{model.config.recompute_steps}")
    print(f"batch: {len(features)} synthetic train samples x {batch['input_ids'].shape[1]} positions (padded), "
          f"{min(chunks)}-{max(chunks)} chunks of {args.chunk_size}, {real_tokens} real tokens, "
          f"{int((batch['labels'] != -100).sum())} supervised")
    print(f"timing: median of {args.repeats} after {args.warmup} warm-up\n")

    with torch.no_grad():  # (a) and (b) compute the same loss; checked before any optimizer step
        vectorised_loss = float(model(**batch).loss)
        naive_value = float(naive_loss(model, batch, pad_id, backward=False))

    head_params = [p for p in model.parameters() if p.requires_grad]
    head_optimizer = torch.optim.AdamW(head_params, lr=1e-4)
    sft_backbone = copy.deepcopy(model.backbone).requires_grad_(True).train()  # (c) trains its own copy
    sft_optimizer = torch.optim.AdamW(sft_backbone.parameters(), lr=1e-5)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    hidden = backbone_forward(model, batch)
    tasks = {  # the pieces of (a) right after it, so each round's remainder compares neighbours in time
        "a": lambda: vectorised_step(model, head_optimizer, batch),
        "backbone": lambda: backbone_forward(model, batch),
        "head": lambda: head_forward_backward(model, hidden, batch),
        "optimizer": head_optimizer.step,  # right after "head", so it steps on real gradients
        "collate": lambda: to_device(collator(features), device),
        "b": lambda: naive_step(model, head_optimizer, batch, pad_id),
        "c": lambda: sft_step(sft_backbone, sft_optimizer, batch, generator),
    }
    saved = saved_for_backward(model, sft_backbone, batch, pad_id, generator)
    timings = interleaved_times(tasks, args.repeats, args.warmup, device)
    clocks = ("wall", "cpu")
    print_table([
        ("(a) vectorised hybrid step (head trained)", timings["a"], saved["a"]),
        ("(b) naive per-chunk loop (head trained)", timings["b"], saved["b"]),
        ("(c) LLaDA SFT, full backbone fine-tuning", timings["c"], saved["c"]),
    ], real_tokens, device)
    passes = naive_positions(batch, pad_id) / batch["input_ids"].numel()
    difference = abs(vectorised_loss - naive_value) / max(abs(vectorised_loss), 1e-12)
    print(f"\nK = {max(chunks)} chunks (rows have {min(chunks)}-{max(chunks)}): the naive loop runs {passes:.2f}x the "
          f"positions of one full pass; loss (a) {vectorised_loss:.6f} vs (b) {naive_value:.6f} "
          f"(relative difference {difference:.1e})\n")
    medians = {name: {c: t.median(c) for c in clocks} for name, t in timings.items()}
    remainders = {clock: per_round_other(timings, clock) for clock in clocks}
    print_breakdown([
        ("step (a), total", medians["a"]),
        ("backbone forward, no grad", medians["backbone"]),
        ("head forward + backward (incl. step logits and CE)", medians["head"]),
        ("AdamW step on the head", medians["optimizer"]),
        ("other: step - (backbone + head + AdamW)", {c: statistics.median(r) for c, r in remainders.items()}),
        ("collation (ChunkMaskingCollator, runs before the step)", medians["collate"]),
    ], device)
    spread = ", ".join(f"{c} {min(r):.1f} to {max(r):.1f} ms" for c, r in remainders.items()
                       if c == "wall" or device == "cpu")
    print(f"\n'other' (masks, output assembly, loss, metrics) is the median of the per-round remainders ({spread}) "
          f"of separately timed pieces, so it carries their noise.")


if __name__ == "__main__":
    main()
