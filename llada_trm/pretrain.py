"""Build the embedded tiny LLaDA backbone: pretraining, an instruct stage and a block stage, with LLaDA's objectives.

1. Pretraining on synthetic reasoning documents (t ~ U(0, 1), p_mask = (1 - 1e-3) t + 1e-3 on every token but
   BOS, loss = sum of CE / p_mask over masked tokens / (B * L)).
2. Instruct stage, as LLaDA-8B-Instruct was made: the same documents, the prompt never masked, the response
   (reasoning, EOS and the EOS fill) masked at one rate per sequence, loss = LLaDA SFT (CE / p_mask over the
   response length). Pretraining alone does not teach a small model to carry the question's quantities into
   the chain; conditioning on an always-visible prompt does.
3. Block stage, as BD3-LM and Fast-dLLM v2 adapt their models to blocks: half of every batch is LLaDA SFT with
   full attention over a response EOS-filled to a random length (so the sampler is stable across budgets), the
   other half clean-context block SFT on the training layout (`--objective block_sft`: each reasoning chunk
   masked at its own rate, predicted against the prompt and the clean chunks before it, the attention the chunk
   decoder and the hybrid run the backbone in).

Each stage is a run of the training program's loop (training/trainer.py: accelerate, global loss normalisation,
atomic checkpoints, metrics.jsonl) with the objectives of training/objectives.py, in its own directory under
`--output_dir` (default runs/tiny-llada): `init/` (the fresh model), `pretrain/`, `instruct/`, `block/`. The
backbone is then scored (masked-token accuracy at mask rate 0.15; exact match on held-out test problems with
LLaDA's sampler, one token per step in blocks of 16, at several new-token budgets, and with the chunk decoder)
and saved atomically, with a manifest, to `--output_dir`/model in the official layout (config.json +
model.safetensors, bf16 storage with `--save_dtype bfloat16`) next to the tokenizer and `pretrain_report.json`:
`--model_name_or_path runs/tiny-llada/model` uses it. The shipped backbone (llada_trm/embedded/assets/tiny-llada)
is replaced only with `--update_shipped_asset`. `--init_from DIR` starts from a saved backbone and its tokenizer
(then `--steps 0 --instruct_steps 0` runs the block stage alone); docs/embedded_default.md says how the shipped
model was built.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import datasets
import torch

from llada_trm.cli import EXIT_USAGE, OneLineParser
from llada_trm.data.arguments import DataArgumentError
from llada_trm.data.collator import mask_seed, pad_batch
from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.data.layout import ANSWER_CLOSE, ANSWER_OPEN, render_example, render_prompt
from llada_trm.data.sources import DataError
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.embedded.assets import ASSETS_DIR, TINY_LLADA_PATH, resolve_backbone_path
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
from llada_trm.model.integrity import replace_directory, save_model_directory
from llada_trm.model.loading import load_tokenizer
from llada_trm.model.modeling_llada import LLaDAModelLM
from llada_trm.training.arguments import UsageError, parse_arguments
from llada_trm.training.diffusion import masked_token_accuracy
from llada_trm.training.objectives import (
    BlockSFTObjective,
    LLaDAPretrainObjective,
    LLaDASFTObjective,
    MicroBatchResult,
    PartMetrics,
)
from llada_trm.training.trainer import Trainer, TrainingError

CHUNK_SIZE = 16
BUDGETS = (64, 96, 128, 160)  # new-token budgets the sampler is reported at (it should not depend on them)
DEFAULT_OUTPUT_DIR = "runs/tiny-llada"
STAGES = ("pretrain", "instruct", "block")
WRITTEN = ("init", *STAGES, "model")  # what a rebuild writes under --output_dir (and --overwrite_output_dir removes)
REPORT = "pretrain_report.json"


# ---------------------------------------------------------------------- data
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


def document_rows(ids: torch.Tensor, supervised: torch.Tensor) -> datasets.Dataset:
    """Documents (D, L) as trainer rows: labels are the ids where `supervised` (what the stage masks and scores),
    -100 elsewhere; no padding; chunk_index numbers the supervised positions' 16-token blocks (-1 elsewhere)."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return datasets.Dataset.from_dict({
        "input_ids": ids.tolist(),
        "attention_mask": torch.ones_like(ids).tolist(),
        "labels": ids.masked_fill(~supervised, -100).tolist(),
        "chunk_index": torch.where(supervised, positions // CHUNK_SIZE, -1).tolist(),
        "sample_id": list(range(len(ids))),
    })


def full_attention_batch(rows: list[dict], eos_id: int, max_response: int, generator: torch.Generator) -> dict:
    """Prompt, then the reasoning (EOS fill included) EOS-filled to a random length in [its length, max_response];
    right-padded. Returns input_ids, attention_mask, is_response and labels (the ids on the response, -100
    elsewhere: the batch of `LLaDASFTObjective`), each (B, L)."""
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
    input_ids = torch.tensor([sequence + [eos_id] * (width - len(sequence)) for sequence in sequences])
    is_response = torch.tensor([response + [False] * (width - len(response)) for response in responses])
    return dict(
        input_ids=input_ids,
        attention_mask=(torch.arange(width)[None, :] < lengths[:, None]).long(),
        is_response=is_response,
        labels=input_ids.masked_fill(~is_response, -100),
    )


# ---------------------------------------------------------------------- the block stage's batches and loss
class BlockStageCollator:
    """A batch of layout rows split in two: the even rows as a full-attention batch (`full_attention_batch`, the
    top level), the odd rows padded as the trainer pads them (`pad_batch`) under "block". The random response
    lengths depend only on (seed, epoch, the batch's first sample), so a resumed run draws them again."""

    def __init__(self, eos_id: int, max_response: int, seed: int):
        self.eos_id, self.max_response, self.seed, self.epoch = eos_id, max_response, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, features: list[dict]) -> dict:
        generator = torch.Generator().manual_seed(mask_seed(self.seed, self.epoch, int(features[0]["sample_id"])))
        batch = full_attention_batch(features[0::2], self.eos_id, self.max_response, generator)
        if len(features) > 1:
            batch["block"] = pad_batch(features[1::2], self.eos_id, CHUNK_SIZE)
        return batch


class BlockStageObjective:
    """The trainer's two backbone objectives on the two halves of a `BlockStageCollator` batch: `LLaDASFTObjective`
    (full attention) and `BlockSFTObjective` (clean-context block SFT). Both are per-sequence means, so the sum of
    their loss sums over the sum of their rows is the mean over every row of the batch."""

    def __init__(self, mask_token_id: int):
        self.full_attention = LLaDASFTObjective(mask_token_id)
        self.block = BlockSFTObjective(mask_token_id)

    def pre_count(self, batch: dict) -> torch.Tensor:
        count = self.full_attention.pre_count(batch)
        return count + self.block.pre_count(batch["block"]) if "block" in batch else count

    def __call__(self, model, batch: dict, generator: torch.Generator | None, token_filters: bool = True
                 ) -> MicroBatchResult:
        parts = {"full_attention": self.full_attention(model, batch, generator)}
        if "block" in batch:
            parts["block"] = self.block(model, batch["block"], generator)
        loss_sum = sum(part.loss_sum for part in parts.values())
        count = sum(part.count for part in parts.values())
        return MicroBatchResult(loss_sum, count, PartMetrics({name: part.metrics for name, part in parts.items()}))


# ---------------------------------------------------------------------- arguments
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


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def parse_args(argv: list[str] | None = None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help="run directory: the stages' runs, and the backbone in its model/ (never the shipped one)")
    parser.add_argument("--update_shipped_asset", action="store_true",
                        help="also replace the shipped backbone (llada_trm/embedded/assets/tiny-llada) with the "
                             "rebuilt one; every command that defaults to tiny-llada then uses it")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="remove an earlier rebuild's init/, stage runs and model/ from --output_dir first")
    parser.add_argument("--num_train", type=int, default=20000)
    parser.add_argument("--num_eval", type=int, default=200, help="held-out test problems for both reports")
    parser.add_argument("--steps", type=int, default=500, help="pretraining steps (0 = none, with --init_from)")
    parser.add_argument("--instruct_steps", type=int, default=7000, help="instruct-stage steps (0 = none)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128, help="document length, a multiple of 16")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--instruct_learning_rate", type=float, default=3e-3)
    parser.add_argument("--block_steps", type=int, default=0, help="block-stage steps (0 = none)")
    parser.add_argument("--block_learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_response", type=int, default=176,
                        help="block stage: full-attention responses are EOS-filled to a random length up to this")
    parser.add_argument("--init_from", default=None, help="start from this saved backbone and its tokenizer")
    parser.add_argument("--warmup_steps", type=int, default=100, help="warm-up steps of each stage")
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--n_layers", type=int, default=6)
    parser.add_argument("--mlp_hidden_size", type=int, default=384)
    parser.add_argument("--save_dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_train", "num_eval", "batch_size", "seq_len", "max_response"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("steps", "instruct_steps", "block_steps", "warmup_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be non-negative, got {getattr(args, name)}")
    if args.seq_len % CHUNK_SIZE:
        parser.error(f"--seq_len must be a multiple of the chunk size {CHUNK_SIZE}, got {args.seq_len}")
    if args.block_steps and args.batch_size < 2:
        parser.error(f"--batch_size must be at least 2 with --block_steps (each half of a batch trains one of the "
                     f"block stage's losses), got {args.batch_size}")
    if args.steps == 0 and args.init_from is None:
        parser.error("--steps must be positive unless --init_from gives a pretrained backbone")
    if _inside(Path(args.output_dir), ASSETS_DIR):
        parser.error(f"--output_dir {args.output_dir} is inside the shipped assets ({ASSETS_DIR}): "
                     + ("--update_shipped_asset installs the backbone there itself; --output_dir is the run "
                        "directory and must be elsewhere" if args.update_shipped_asset else
                        f"a rebuild writes to a run directory (default {DEFAULT_OUTPUT_DIR}); add "
                        "--update_shipped_asset to replace the shipped backbone"))
    if args.init_from and args.overwrite_output_dir and _inside(Path(resolve_backbone_path(args.init_from)),
                                                                Path(args.output_dir)):
        parser.error(f"--init_from {args.init_from} is inside --output_dir {args.output_dir}, which "
                     "--overwrite_output_dir would clear first")
    return args


# ---------------------------------------------------------------------- the stages
def stage_arguments(args, name: str, model_dir: Path, steps: int, learning_rate: float):
    """The training program's arguments of one stage: the backbone alone, trained whole, in fp32, for `steps`
    optimiser steps of AdamW (weight decay 0.01, gradients clipped to 1) with `--warmup_steps` of warm-up then a
    cosine decay, checkpointed once at the end; no held-out scoring (the rebuild scores the result itself)."""
    warmup = min(args.warmup_steps, steps - 1)
    flags = ["--model_name_or_path", str(model_dir), "--objective", "llada_sft", "--no_freeze_backbone",
             "--output_dir", str(Path(args.output_dir) / name), "--chunk_size", str(CHUNK_SIZE),
             "--max_steps", str(steps), "--batch_size", str(args.batch_size), "--learning_rate", str(learning_rate),
             "--lr_scheduler_type", "cosine", "--warmup_ratio", str((warmup + 0.5) / steps if warmup > 0 else 0.0),
             "--weight_decay", "0.01", "--max_grad_norm", "1.0", "--mixed_precision", "no",
             "--seed", str(args.seed + STAGES.index(name)), "--logging_steps", "100", "--save_total_limit", "1",
             "--eval_max_samples", "0"]
    return parse_arguments(flags, environ={})


def stage_data(args, name: str, tokenizer) -> tuple[datasets.Dataset, object, object]:
    """The training rows, the objective (training/objectives.py) and the collator (None: the trainer's padding)
    of stage `name`."""
    mask_id = tokenizer.mask_token_id
    if name == "block":
        layout = prepare_dataset(DataArguments(num_synthetic_train=args.num_train), tokenizer, CHUNK_SIZE, "train")
        return (layout.dataset, BlockStageObjective(mask_id),
                BlockStageCollator(tokenizer.eos_token_id, args.max_response, args.seed))
    records = generate_split("train", args.num_train, seed=args.seed)
    ids, _, is_response = encode_documents(tokenizer, records, args.seq_len)
    print(f"{name}: {len(ids)} training documents of {len(records)}")
    if name == "instruct":
        return document_rows(ids, is_response), LLaDASFTObjective(mask_id), None
    not_bos = torch.ones_like(ids, dtype=torch.bool)
    not_bos[:, 0] = False
    return document_rows(ids, not_bos), LLaDAPretrainObjective(mask_id), None


def run_stage(args, name: str, model_dir: Path, tokenizer, steps: int, learning_rate: float) -> Path:
    """Train stage `name` from the backbone in `model_dir` with the training loop; returns the trained backbone's
    directory (the stage run's exported model/)."""
    rows, objective, collator = stage_data(args, name, tokenizer)
    trainer = Trainer(stage_arguments(args, name, model_dir, steps, learning_rate), train_dataset=rows,
                      objective=objective, collator=collator)
    return Path(trainer.train()["model"])


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


# ---------------------------------------------------------------------- atomic writes
def save_backbone(model, tokenizer, target: Path, report: dict | None = None) -> Path:
    """The backbone in the official layout, its tokenizer, the report and a manifest, written beside `target` and
    renamed to it."""
    return save_model_directory(model, tokenizer, target, {REPORT: report} if report is not None else None)


def install_shipped_asset(model_dir: Path, asset_dir: Path | None = None) -> Path:
    """--update_shipped_asset: copy the rebuilt backbone (manifest included) over the shipped one."""
    asset_dir = TINY_LLADA_PATH if asset_dir is None else asset_dir
    staging = asset_dir.with_name(f".tmp-{asset_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging)
    replace_directory(staging, asset_dir)
    return asset_dir


def prepare_output_dir(args) -> Path:
    """--output_dir, refused if an earlier rebuild is there (unless --overwrite_output_dir, which removes it)."""
    out = Path(args.output_dir)
    earlier = [name for name in WRITTEN if (out / name).exists()]
    if earlier and not args.overwrite_output_dir:
        raise UsageError(f"--output_dir {out} holds an earlier rebuild ({', '.join(earlier)}); add "
                         "--overwrite_output_dir or choose another directory")
    for name in earlier:
        shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------- the program
def build(args) -> dict:
    torch.manual_seed(args.seed)
    began = time.time()
    out = prepare_output_dir(args)
    if args.init_from:
        model_dir = Path(resolve_backbone_path(args.init_from))
        tokenizer = load_tokenizer(model_dir)
    else:
        texts = (render_example(**r) for r in generate_split("train", args.num_train, seed=args.seed))
        tokenizer = train_tokenizer(texts, whole_tokens=(ANSWER_OPEN, ANSWER_CLOSE))
        model_dir = save_backbone(LLaDAModelLM(build_config(tokenizer, args)), tokenizer, out / "init")
    stages = {}
    for name, steps, learning_rate in (("pretrain", args.steps, args.learning_rate),
                                       ("instruct", args.instruct_steps, args.instruct_learning_rate),
                                       ("block", args.block_steps, args.block_learning_rate)):
        if steps:
            model_dir = run_stage(args, name, model_dir, tokenizer, steps, learning_rate)
            stages[name] = {"steps": steps, "learning_rate": learning_rate, "run": str(out / name)}
    train_seconds = time.time() - began

    model = LLaDAModelLM.from_pretrained(model_dir).eval()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    eval_ids, eval_is_text, _ = encode_documents(tokenizer, generate_split("test", args.num_eval, seed=args.seed),
                                                 args.seq_len)
    accuracy = masked_token_accuracy(model, eval_ids, eval_is_text, 0.15, model.config.mask_token_id,
                                     torch.Generator().manual_seed(1234))
    exact_match = held_out_exact_match(model, tokenizer, args.num_eval)
    print(f"held-out masked-token accuracy at mask rate 0.15: {accuracy:.3f}")
    for name, value in exact_match.items():
        print(f"held-out {name}: {value}")
    report = {
        "masked_token_accuracy@0.15": round(accuracy, 4),
        **exact_match,
        "args": vars(args),
        "stages": stages,
        "train_seconds": round(train_seconds),
        "seconds": round(time.time() - began),
        "torch": torch.__version__,
    }
    earlier_report = Path(resolve_backbone_path(args.init_from)) / REPORT if args.init_from else None
    if earlier_report is not None and earlier_report.is_file():  # the backbone's history goes with it
        report["initialised_from"] = json.loads(earlier_report.read_text())
    saved = save_backbone(model.to(getattr(torch, args.save_dtype)), tokenizer, out / "model", report)
    print(f"saved to {saved} (use it with --model_name_or_path {saved})")
    if args.update_shipped_asset:
        print(f"replaced the shipped backbone: {install_shipped_asset(saved)}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        build(args)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (UsageError, DataError, DataArgumentError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
