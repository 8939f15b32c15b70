"""Scores on the held-out split during training: the objective's loss, and exact match of the decoders.

What is notable:
- The held-out loss is the training objective on every supervised token: no truncation, no token weights.
- Answer accuracy is the fair comparison of inference/exact_match.py: the backbone with LLaDA's sampler and
  through the chunk decoder, and the hybrid with generate_with_refinement, each with its standard error; the
  sampler scores the first --eval_sampler_max_samples of the problems (its 16 passes per chunk). A frozen backbone
  answers the same at every evaluation, so its rows are computed once and kept on the trainer.
- `decoding_frontier` scores a few more decoders on the same rows and budget, with what each costs per backbone
  pass (inference/frontier.py): the end of the main command and `compare` print it.
- Each function takes the `Trainer` (training/trainer.py) that calls it; this module does not import it back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from llada_trm.inference.exact_match import default_new_token_budget, fair_evaluation, hybrid_lead, scored_rows
from llada_trm.inference.frontier import BACKBONE_KINDS, DECODER_KINDS, frontier, parse_points
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.training.arguments import RunArguments


@torch.no_grad()
def held_out_loss(trainer) -> dict:
    """eval_loss, and for the hybrid the last step's loss and perplexity and the backbone-only loss."""
    acc = trainer.accelerator
    trainer.model.eval()
    # loss_sum, count, then CE sums over the supervised tokens (last step, backbone) and over the masked ones
    sums = torch.zeros(6, device=acc.device)
    supervised = torch.zeros(2, device=acc.device)  # supervised tokens, masked ones
    for i, batch in enumerate(trainer.eval_loader):
        with acc.autocast():
            result = trainer.objective(trainer.model, batch, trainer.generator_for(0, i), token_filters=False)
        sums[0] += result.loss_sum.float()
        sums[1] += result.count
        output = result.output
        if output is not None:
            last, backbone = output.step_token_loss[-1].float(), output.backbone_token_loss.float()
            for column, where in ((2, output.supervised_mask), (4, output.masked_positions)):
                sums[column] += (last * where).sum()
                sums[column + 1] += (backbone * where).sum()
            supervised += torch.stack((output.supervised_mask.sum(), output.masked_positions.sum()))
    sums, supervised = acc.reduce(sums, "sum"), acc.reduce(supervised, "sum")
    trainer.model.train()
    metrics = {"eval_loss": float(sums[0] / sums[1].clamp(min=1e-12))}
    if float(supervised[0]) > 0:
        last_ce = float(sums[2] / supervised[0])
        metrics.update(eval_last_step_loss=last_ce, eval_perplexity=math.exp(min(last_ce, 50)),
                       eval_backbone_loss=float(sums[3] / supervised[0]))
    else:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    if float(supervised[1]) > 0:  # what decoding reads: the head's and the backbone's loss where the input is masked
        metrics.update(eval_masked_chunk_loss=float(sums[4] / supervised[1]),
                       eval_backbone_masked_chunk_loss=float(sums[5] / supervised[1]))
    return metrics


def answer_accuracy(trainer) -> dict:
    """Exact-match metrics of every decoder (main process); the full evaluation goes to `trainer.fair_eval`."""
    t, m = trainer.args.train, trainer.args.model
    if trainer.eval_data is None or t.eval_max_samples == 0 or not trainer.accelerator.is_main_process:
        return {}
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_hybrid = isinstance(model, LLaDATRMHybrid)
    rows, _ = scored_rows(trainer.eval_data.dataset, t.eval_max_samples)
    budget = t.eval_max_new_tokens or default_new_token_budget(rows, m.chunk_size)
    options = dict(tokenizer=trainer.tokenizer, rows=rows, max_new_tokens=budget, chunk_size=m.chunk_size,
                   batch_size=t.eval_batch_size or t.batch_size, progress=False,
                   decode_steps_per_chunk=t.eval_decode_steps_per_chunk,
                   sampler_max_samples=t.eval_sampler_max_samples)
    frozen = is_hybrid and model.config.freeze_backbone
    kept = trainer.frozen_backbone_rows
    models = {name: net for name, net in _decoders(model, trainer.args).items() if not (frozen and name in kept)}
    evaluation = fair_evaluation(models=models, **options)
    if frozen:
        kept.update({k: v for k, v in evaluation["decoders"].items() if k != "hybrid_refined"})
        evaluation["decoders"] = {**kept, **evaluation["decoders"]}
        evaluation["accuracy"] = {name: r["accuracy"] for name, r in evaluation["decoders"].items()}
        evaluation["hybrid_lead"] = hybrid_lead(evaluation["decoders"])
    evaluation["accuracy"].setdefault("hybrid_refined", None)
    trainer.fair_eval = {"step": trainer.state.global_step, **evaluation}
    model.train()
    metrics = {f"eval_accuracy_{name}": value for name, value in evaluation["accuracy"].items() if value is not None}
    metrics["eval_num_samples"] = evaluation["num_samples"]
    if is_hybrid:
        metrics["eval_mean_refinement_steps"] = evaluation["decoders"]["hybrid_refined"]["mean_refinement_steps"]
    return metrics


# The main command's extra points: cheap ones that the fair table lacks (it has the one-token sampler and the chunk
# decoders at --eval_decode_steps_per_chunk rounds): the sampler at one pass per chunk, and the chunk decoders at one
# pass per chunk where the table scored them at more rounds. Threshold decoding and the rest: python -m
# llada_trm.frontier.
FINAL_POINTS = {"hybrid": "sampler/k16,chunked/r1,hybrid/r1", "backbone": "sampler/k16,chunked/r1"}


def decoding_frontier(trainer, points: str | None = None, flop_sample: int = 0) -> dict | None:
    """Frontier points (comma-separated names; default FINAL_POINTS, less the chunk-decoder points the fair table
    already scored) of the trainer's model on the rows and budget of its last answer accuracy; points that need a
    head are dropped for a plain LLaDA. None without one."""
    t = trainer.args.train
    if trainer.fair_eval is None or not trainer.accelerator.is_main_process:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_hybrid = isinstance(model, LLaDATRMHybrid)
    kinds = DECODER_KINDS if is_hybrid else BACKBONE_KINDS
    names = points if points is not None else FINAL_POINTS["hybrid" if is_hybrid else "backbone"]
    chosen = [p for p in parse_points(names, trainer.args.model.chunk_size) if p.kind in kinds]
    if points is None:  # the table's chunk decoders ran at --eval_decode_steps_per_chunk rounds, no threshold
        chosen = [p for p in chosen if p.kind == "sampler" or p.threshold is not None
                  or p.per_step != t.eval_decode_steps_per_chunk]
    if not chosen:
        return None
    rows, _ = scored_rows(trainer.eval_data.dataset, t.eval_max_samples)
    decoder_model = model if is_hybrid else backbone_only_hybrid(model, trainer.args)
    result = frontier(decoder_model, trainer.tokenizer, rows, trainer.fair_eval["max_new_tokens"], chosen,
                      batch_size=t.eval_batch_size or t.batch_size, flop_sample=flop_sample, progress=False,
                      sampler_max_samples=t.eval_sampler_max_samples)
    model.train()
    return result


def _decoders(model, args: RunArguments) -> dict:
    """The models to score by decoder name; a plain backbone gets an untouched head for the chunk decoder."""
    if isinstance(model, LLaDATRMHybrid):
        return {"backbone_llada_sampler": model.backbone, "backbone_chunked": model, "hybrid_refined": model}
    return {"backbone_llada_sampler": model, "backbone_chunked": backbone_only_hybrid(model, args)}


def write_eval_results(fair_eval: dict | None, output_dir: str, is_main_process: bool) -> Path | None:
    """`eval_results.json` in the run directory: the last fair evaluation (main process)."""
    if fair_eval is None or not is_main_process:
        return None
    path = Path(output_dir) / "eval_results.json"
    path.write_text(json.dumps(fair_eval, indent=2) + "\n")
    return path


def backbone_only_hybrid(backbone, args: RunArguments) -> LLaDATRMHybrid:
    """Wrap a plain backbone with an untouched head (out_proj = 0), so chunk decoding uses the backbone alone."""
    trainable = [p.requires_grad for p in backbone.parameters()]
    config = HybridConfig(backbone_name_or_path=args.model.model_name_or_path, chunk_size=args.model.chunk_size)
    hybrid = LLaDATRMHybrid(config, backbone)
    for parameter, flag in zip(backbone.parameters(), trainable):  # wrapping must not freeze the trained backbone
        parameter.requires_grad_(flag)
    return hybrid
