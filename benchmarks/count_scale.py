"""`bench_scale.py --count_flops`: the counted FLOPs of training and decoding at a LLaDA shape, on a CPU.

    python benchmarks/bench_scale.py --shape 8b --count_flops        # about 15 minutes, 16 GB of memory at most
    python benchmarks/bench_scale.py --shape 8b --count_flops --skip_levers --skip_decode   # the headline, 2 minutes

Every row runs the project's own code (LLaDATRMHybrid.forward and backward, the LLaDA SFT loss under peft LoRA,
generate_with_refinement, the LLaDA sampler) under FlopCounterMode with shapes only (benchmarks/flop_count.py),
built with 1 and 2 backbone layers and two small vocabularies and extended to the shape (`extrapolate`). The hybrid's settings are the
8B config's (configs/llada8b_natural_reasoning.yaml, parsed as the training program parses it), then the same
with one lever changed at a time. FLOPs count matrix products and attention (dense), forward and backward; the
optimizer step, norms, softmax and other elementwise work are not counted (FlopCounterMode's convention).

Training rows: batch `--batch_size` x (`--prompt_length` + `--num_chunks` x 16), 30 % of the chunks masked, as
bench_scale times them. Decoding rows: batch 1, `--new_tokens` after a `--prompt_length` prompt, per new token;
the KV caches' attention is included. The refinement decoders run a fixed number of refinement steps per chunk
(min = max), since a random head's confidences say nothing about where a trained one halts.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import CHUNK, config_of_8b_recipe, sft_loss, shape_config, training_batch  # noqa: E402
from flop_count import FlopSplit, count_flops, extrapolate, lazy_parameters, parts_of  # noqa: E402
from flop_count import shape_only_compute  # noqa: E402
from timing import SavedTensorMeter  # noqa: E402

from llada_trm.inference.chunk_decoding import generate_with_refinement  # noqa: E402
from llada_trm.inference.sampler import PassCounter, generate  # noqa: E402
from llada_trm.model.configuration_hybrid import HybridConfig  # noqa: E402
from llada_trm.model.configuration_llada import LLaDAConfig  # noqa: E402
from llada_trm.model.hybrid import LLaDATRMHybrid  # noqa: E402
from llada_trm.model.modeling_llada import LLaDAModelLM  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "attn_out"]


def lever_variants(base: HybridConfig) -> dict[str, dict]:
    """One lever of the 8B recipe changed at a time: {row name: HybridConfig overrides}. Unmasked chunks that weigh
    need their last step scored (final_step_positions all), so the rows that give them weight say so too."""
    steps = base.max_recursive_steps
    weighs = dict(unmasked_chunk_weight=1.0, final_step_positions="all")
    variants = {f"clean_context {not base.clean_context}": dict(clean_context=not base.clean_context),
                f"draft_feedback {not base.draft_feedback}": dict(draft_feedback=not base.draft_feedback),
                ("unmasked_chunk_weight 0.0" if base.unmasked_chunk_weight else
                 "unmasked_chunk_weight 1.0 (final_step_positions all)"): (
                    dict(unmasked_chunk_weight=0.0) if base.unmasked_chunk_weight else weighs)}
    for fewer in sorted({max(1, steps // 2), max(1, steps // 4)} - {steps}, reverse=True):
        variants[f"max_recursive_steps {fewer}"] = dict(max_recursive_steps=fewer,
                                                        min_recursive_steps=min(base.min_recursive_steps, fewer))
    if (steps, base.latent_steps) != (8, 2):
        variants["8 refinement steps of 2 latent updates (the design's recursion)"] = dict(
            max_recursive_steps=8, min_recursive_steps=2, latent_steps=2)
    for name in ("intermediate_step_positions", "final_step_positions"):
        other = "masked" if getattr(base, name) == "all" else "all"
        if name == "final_step_positions" and other == "masked" and base.unmasked_chunk_weight:
            continue  # it needs unmasked_chunk_weight 0
        variants[f"{name} {other}"] = {name: other}
    variants[f"checkpoint_refinement_steps {not base.recompute_steps}"] = dict(
        checkpoint_refinement_steps=not base.recompute_steps)
    design = dict(clean_context=False, draft_feedback=False, **weighs)
    if any(getattr(base, k) != v for k, v in design.items()):
        variants["the design's levers (no clean context, no draft feedback, unmasked weight 1)"] = design
    embedded = dict(clean_context=True, draft_feedback=True, unmasked_chunk_weight=0.0)
    if any(getattr(base, k) != v for k, v in embedded.items()):
        variants["the embedded default's levers (clean context, draft feedback, unmasked weight 0)"] = embedded
    return variants


# ------------------------------------------------------------------------------------------------ models

def reduced(config: LLaDAConfig, n_layers: int, vocab_size: int) -> LLaDAConfig:
    """The shape with fewer layers and a smaller vocabulary (its special tokens moved to its top)."""
    return dataclasses.replace(config, n_layers=n_layers, vocab_size=vocab_size, embedding_size=vocab_size,
                               mask_token_id=vocab_size - 1, eos_token_id=vocab_size - 2,
                               pad_token_id=vocab_size - 2, bos_token_id=vocab_size - 3)


def lazy_backbone(config: LLaDAConfig, n_layers: int) -> LLaDAModelLM:
    with torch.device("meta"):
        backbone = LLaDAModelLM(dataclasses.replace(config, n_layers=n_layers))
    return lazy_parameters(backbone).eval()


def lazy_hybrid(config: LLaDAConfig, n_layers: int, hybrid: HybridConfig) -> LLaDATRMHybrid:
    """Built whole on the meta device, then given lazy storage: no initialiser ever writes a weight."""
    with torch.device("meta"):
        backbone = LLaDAModelLM(dataclasses.replace(config, n_layers=n_layers))
        model = LLaDATRMHybrid(dataclasses.replace(hybrid), backbone=backbone)
    return lazy_parameters(model).train()


def counted(model, forward: Callable[[], torch.Tensor | None], backward: bool) -> FlopSplit:
    """FLOPs of forward (+ backward of what it returns); saved MiB of the forward alone."""
    meter = SavedTensorMeter(model)

    def run():
        with meter:
            loss = forward()
        if backward:
            loss.backward()

    with shape_only_compute():
        return count_flops(run, parts_of(model), meter)


# ------------------------------------------------------------------------------------------------ rows

def training_counts(config: LLaDAConfig, n_layers: int, recipe: HybridConfig, args) -> dict[str, FlopSplit]:
    batch = training_batch(config, args, "cpu")
    rows = {}
    base = lazy_hybrid(config, n_layers, recipe)

    def backbone_forward():
        with torch.no_grad():
            base.backbone_hidden_states(batch["input_ids"], batch["attention_mask"], batch["chunk_index"])

    rows["backbone forward, no grad"] = counted(base, backbone_forward, backward=False)
    rows["hybrid step, 8B config"] = counted(base, lambda: base(**batch).loss, backward=True)
    for name, overrides in ({} if args.skip_levers else lever_variants(recipe)).items():
        model = lazy_hybrid(config, n_layers, dataclasses.replace(recipe, **overrides))
        rows[f"  with {name}"] = counted(model, lambda m=model: m(**batch).loss, backward=True)
    rows.update(sft_counts(config, n_layers, batch))
    return rows


def sft_counts(config: LLaDAConfig, n_layers: int, batch: dict) -> dict[str, FlopSplit]:
    """Counted on the first row and multiplied by the batch size: the SFT loss's products do not depend on which
    tokens are masked, and the rows have one length, so this is exact (and keeps the (L, V) logits of one row)."""
    from peft import LoraConfig, get_peft_model

    rows = {}
    generator = torch.Generator().manual_seed(0)
    one_row, size = {k: v[:1] for k, v in batch.items()}, len(batch["input_ids"])
    backbone = lazy_backbone(config, n_layers).train()
    backbone.gradient_checkpointing_enable()
    lora = get_peft_model(backbone, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS)).train()
    rows["LLaDA SFT, LoRA r=16 (q,k,v,attn_out), grad ckpt"] = counted(
        lora, lambda: sft_loss(lora, one_row, generator), backward=True) * size
    del lora, backbone
    full = lazy_backbone(config, n_layers).train().requires_grad_(True)
    full.gradient_checkpointing_enable()
    rows["LLaDA SFT, full, grad ckpt"] = counted(full, lambda: sft_loss(full, one_row, generator),
                                                 backward=True) * size
    return rows


def decoding_counts(config: LLaDAConfig, n_layers: int, recipe: HybridConfig, args) -> dict[str, FlopSplit]:
    """Per new token at batch 1 (sampler rows: per pass, which is per token at one token per step)."""
    n, rows = args.new_tokens, {}
    prompt = torch.randint(0, min(config.vocab_size, config.mask_token_id), (1, args.prompt_length),
                           generator=torch.Generator().manual_seed(1))
    model = lazy_hybrid(config, n_layers, recipe).eval()

    def refinement(**options) -> tuple[FlopSplit, int]:
        """(FLOPs, backbone passes) of one decoding run."""
        runs = []
        split = counted(model, lambda: runs.append(generate_with_refinement(
            model, prompt, max_new_tokens=n, ignore_eos=True, **options)), backward=False)
        return split, runs[0].backbone_row_passes

    def later_pass(one_pass: tuple[FlopSplit, int], by_threshold: tuple[FlopSplit, int]) -> FlopSplit:
        """commit_threshold above 1 commits one token a round: the rounds after a chunk's first run the chunk
        alone against the caches; their FLOPs per pass are the difference of the two runs per extra pass."""
        return (by_threshold[0] - one_pass[0]) / (by_threshold[1] - one_pass[1])

    with torch.no_grad():
        for steps in sorted({recipe.max_recursive_steps, recipe.min_recursive_steps}, reverse=True):
            fixed = dict(min_recursive_steps=steps, max_recursive_steps=steps)
            one_pass = refinement(**fixed)
            plural = "s" if steps > 1 else ""
            rows[f"hybrid, 1 pass per chunk, {steps} step{plural}"] = one_pass[0] / n
            rows[f"  hybrid, one later pass of threshold decoding ({steps} step{plural})"] = later_pass(
                one_pass, refinement(**fixed, commit_threshold=2.0))
        decoder = refinement(enable_refinement=False)
        rows["chunk decoder (no head), 1 pass per chunk"] = decoder[0] / n
        rows["  chunk decoder, one later pass of threshold decoding"] = later_pass(
            decoder, refinement(enable_refinement=False, commit_threshold=2.0))
        counter = PassCounter()
        blocks = n // args.block_length
        sampler = counted(model.backbone, lambda: generate(model.backbone, prompt, steps=blocks, gen_length=n,
                                                           block_length=args.block_length, counter=counter),
                          backward=False)
        rows["LLaDA sampler, one token per step (= one pass, threshold too)"] = sampler / counter.backbone_forwards
    return rows


# ------------------------------------------------------------------------------------------------ table

def print_counts(train: dict[str, FlopSplit], decode: dict[str, FlopSplit], args) -> None:
    """The training table, the decoding table and the goals of issue 31, each where its rows were counted."""
    if train:
        print_training(train, args)
    if decode:
        print_decoding(decode, args)
    print("\ngoals (issue 31, stated for the 8b shape at batch 4 x (128 + 32 x 16)):")
    if train:
        forward, hybrid = train["backbone forward, no grad"], train["hybrid step, 8B config"]
        lora = train["LLaDA SFT, LoRA r=16 (q,k,v,attn_out), grad ckpt"]
        print(f"  hybrid step / LoRA step               {hybrid.total / lora.total:6.2f}   (goal <= 0.5)")
        print(f"  hybrid step / backbone forward        {hybrid.total / forward.total:6.2f}   (goal <= 1.5)")
        ratio = hybrid.saved_mib / max(lora.saved_mib, 1e-9)
        print(f"  hybrid saved / LoRA saved             {ratio:6.2f}   (goal <= 0.25)")
    if decode:
        refined, sampler = (decode[next(k for k in decode if k.startswith(prefix))]
                            for prefix in ("hybrid, 1 pass", "LLaDA sampler"))
        print(f"  refinement token / sampler token      {refined.total / sampler.total:6.4f}   (goal <= {1 / 12:.4f})")


def print_training(train: dict[str, FlopSplit], args) -> None:
    forward = train["backbone forward, no grad"]
    lora = train["LLaDA SFT, LoRA r=16 (q,k,v,attn_out), grad ckpt"]
    print(f"training, TFLOP per step (batch {args.batch_size} x ({args.prompt_length} + {args.num_chunks} x {CHUNK}))")
    header = f"{'row':<84}{'backbone':>9}{'head':>8}{'output':>8}{'attn':>8}{'total':>8}{'x fwd':>7}{'x LoRA':>7}"
    print(header + f"{'saved MiB':>11}")
    for name, s in train.items():
        values = "".join(f"{v / 1e12:>{w}.2f}" for v, w in ((s.backbone, 9), (s.head, 8), (s.output_layer, 8),
                                                                 (s.attention, 8), (s.total, 8)))
        print(f"{name:<84}{values}{s.total / forward.total:>7.2f}{s.total / lora.total:>7.2f}{s.saved_mib:>11.1f}")


def print_decoding(decode: dict[str, FlopSplit], args) -> None:
    sampler = decode[next(k for k in decode if k.startswith("LLaDA sampler"))]
    print(f"\ndecoding, GFLOP per new token (later-pass rows: per pass; batch 1, {args.new_tokens} new tokens after "
          f"a {args.prompt_length}-token prompt)")
    print(f"{'row':<84}{'backbone':>9}{'head':>8}{'output':>8}{'attn':>8}{'total':>8}{'x sampler':>11}")
    for name, s in decode.items():
        values = "".join(f"{v / 1e9:>{w}.2f}" for v, w in ((s.backbone, 9), (s.head, 8), (s.output_layer, 8),
                                                                (s.attention, 8), (s.total, 8)))
        print(f"{name:<84}{values}{s.total / sampler.total:>11.4f}")


def hand_back_freed_memory() -> None:
    """Each count allocates and frees GBs (activations of a full-width batch); glibc keeps freed heap blocks for
    reuse, and a row-by-row table then grew past 20 GB. Blocks of 1 MiB and more are mmapped instead, so freeing
    one returns it to the OS (a no-op off glibc)."""
    m_mmap_threshold = -3
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 20)


def main(args) -> None:
    hand_back_freed_memory()
    torch.set_num_threads(args.threads)
    config = shape_config(args.shape)
    recipe = config_of_8b_recipe(args.recipe, args.max_recursive_steps)
    recipe.resolve_head_shape(config.d_model)
    print(f"counted FLOPs, shape {args.shape}: d_model {config.d_model}, {config.n_layers} layers (counted at 1 and 2 "
          f"layers and vocabularies of 512 and 1,024, extended linearly), vocab {config.vocab_size}; head {recipe.head_hidden_size} wide, "
          f"{recipe.max_recursive_steps} steps of {recipe.latent_steps} latent updates; 8B config: "
          f"clean_context {recipe.clean_context}, draft_feedback {recipe.draft_feedback}, unmasked_chunk_weight "
          f"{recipe.unmasked_chunk_weight}\n")
    def count(rows: Callable, skip: bool) -> dict[str, FlopSplit]:
        if skip:
            return {}
        if args.count_all_layers:
            return rows(config, config.n_layers, recipe, args)
        return extrapolate(lambda k, v: rows(reduced(config, k, v), k, recipe, args), config.n_layers,
                           config.vocab_size)

    print_counts(count(training_counts, args.skip_train), count(decoding_counts, args.skip_decode), args)
