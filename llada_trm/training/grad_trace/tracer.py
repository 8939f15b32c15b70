"""The per-token gradient trace during training: `--token_grad_trace_every N` (0 = off).

Every N optimiser steps, on the main process, before the step's own backward (so with the parameters that
step's gradient is taken at), the first micro-batch of the step is traced: one forward of the objective on the
whole micro-batch, then exact per-token gradients for the chosen parameters (exact.py), written to
`token_grad_trace.jsonl` in the run directory. The trace uses its own copy of the step's random generator and
`torch.autograd.grad` (never `.backward`), so the parameters' `.grad`, the random streams and therefore the
training itself are exactly what they are without it.

Records, one JSON object a line, told apart by `record`:
- `trace`: step, objective, chosen parameters, which took the outer-product fast path, |G|, seconds taken;
- `sample`: step, sample_id, the prompt text and the response tokens (position, text);
- `token`: one per traced token (fields in docs/grad_trace.md).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from llada_trm.data.collator import micro_batch_generator
from llada_trm.training.arguments import UsageError

from llada_trm.training.grad_trace.exact import DEFAULT_MAX_BYTES, LinearCapture, TokenGradients, batched_token_gradients
from llada_trm.training.grad_trace.selection import TraceSelectionError, fast_linears, parse_patterns, select_parameters
from llada_trm.training.grad_trace.token_types import TokenTexts
from llada_trm.training.grad_trace.views import HybridView, LLaDASFTView, MicroBatchTrace

TRACE_FILE = "token_grad_trace.jsonl"


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


class TokenGradTracer:
    def __init__(self, model, objective_name: str, objective, tokenizer=None, output_dir: str | None = None,
                 every: int = 1, params: str | None = None, write: bool = True, max_bytes: int = DEFAULT_MAX_BYTES):
        self.objective_name, self.every, self.write, self.max_bytes = objective_name, every, write, max_bytes
        self.view = HybridView(objective) if objective_name == "hybrid" else LLaDASFTView(objective)
        self.chosen = select_parameters(model, parse_patterns(params, model, objective_name))
        self.fast = fast_linears(model, objective_name, self.chosen)
        fast_weights = {id(m.weight) for m in self.fast.values()}
        self.general = {n: p for n, p in self.chosen.items() if id(p) not in fast_weights}
        self.fast_param = {name: f"{name}.weight" for name in self.fast}
        self.texts = TokenTexts(tokenizer)
        self.path = Path(output_dir) / TRACE_FILE if output_dir is not None else None

    # ------------------------------------------------------------------ the trainer's hook
    def maybe_trace(self, trainer, micro_batch: dict) -> list[dict] | None:
        """Called at the start of every optimiser step; traces when the step about to be taken is due."""
        step, acc = trainer.state.global_step + 1, trainer.accelerator
        if step % self.every or not acc.is_main_process:
            return None

        t = trainer.args.train
        generator = micro_batch_generator(t.seed, trainer.state.global_step, 0, acc.process_index, acc.device)
        model = acc.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()  # same computation (no dropout); no recomputation hooks in the traced graph
        try:
            with acc.autocast():
                return self.trace(model, micro_batch, generator, step)
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ one trace
    def trace(self, model, batch: dict, generator, step: int) -> list[dict]:
        started, cpu = time.perf_counter(), time.process_time()
        trace, grads = self.token_gradients(model, batch, generator)
        records = self.records(trace, grads, batch, step, time.perf_counter() - started)
        records[0]["cpu_seconds"] = round(time.process_time() - cpu, 4)
        if self.write and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        return records

    def token_gradients(self, model, batch: dict, generator) -> tuple[MicroBatchTrace, TokenGradients]:
        """Exact per-token quantities for every traced token of the micro-batch (in the trace's token order)."""
        trace = self.view.prepare(model, batch, generator, self.chosen)
        general_params = list(self.general.values())
        general_aggregate = torch.cat([trace.aggregate[n].flatten() for n in self.general]) if self.general \
            else torch.zeros(0, device=trace.alpha.device)
        fast_aggregate = {name: trace.aggregate[param] for name, param in self.fast_param.items()}
        parts = []
        for row in torch.unique_consecutive(trace.rows).tolist():
            with LinearCapture(self.fast) as capture:
                losses, layer_rows = self.view.sample_step_losses(model, row)
            if self.fast:
                capture.backward(losses)
            part = capture.token_gradients(layer_rows, fast_aggregate, trace.alpha) if self.fast else \
                TokenGradients.zeros(len(losses), losses[0].numel(), trace.alpha.device)
            if general_params:
                part = part + batched_token_gradients(losses, general_params, general_aggregate, trace.alpha,
                                                      self.max_bytes)
            parts.append(part)
        merged = TokenGradients(*(torch.cat([getattr(p, f) for p in parts], dim=-1)
                                  for f in ("step_norm2", "step_dot", "norm2", "dot")))
        return trace, merged

    def aggregate_norm(self, trace: MicroBatchTrace) -> float:
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in trace.aggregate.values()))

    # ------------------------------------------------------------------ records
    def records(self, trace: MicroBatchTrace, grads: TokenGradients, batch: dict, step: int,
                seconds: float) -> list[dict]:
        g_norm = self.aggregate_norm(trace)
        header = {"record": "trace", "step": step, "objective": self.objective_name,
                  "params": sorted(self.chosen), "num_parameters": sum(p.numel() for p in self.chosen.values()),
                  "fast_path": sorted(self.fast), "aggregate_norm": _round(g_norm),
                  "refinement_steps": int(trace.alpha.numel()) if self.objective_name == "hybrid" else None,
                  "tokens": int(trace.rows.numel()), "seconds": round(seconds, 4)}
        rows = torch.unique_consecutive(trace.rows).tolist()
        return [header, *(self._sample_record(batch, row, step) for row in rows),
                *self._token_records(trace, grads, batch, step, g_norm)]

    def _sample_record(self, batch: dict, row: int, step: int) -> dict:
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        chunk, real = batch["chunk_index"][row].tolist(), batch["attention_mask"][row].tolist()
        prompt = [i for i, c, a in zip(ids, chunk, real) if c < 0 and a]
        decode = self.texts.tokenizer.decode if self.texts.tokenizer is not None else str
        return {"record": "sample", "step": step, "sample_id": _sample_id(batch, row),
                "prompt": decode(prompt) if prompt else "",
                "response": [[p, self.texts(label)[0]] for p, label in enumerate(labels) if label != -100]}

    def _token_records(self, trace, grads, batch, step, g_norm) -> list[dict]:
        norm = grads.norm2.clamp(min=0).sqrt()
        step_norm = grads.step_norm2.clamp(min=0).sqrt()
        with_steps = self.objective_name == "hybrid"
        records = []
        for i in range(trace.rows.numel()):
            row, position = int(trace.rows[i]), int(trace.positions[i])
            token_id = int(batch["labels"][row, position])
            text, kind = self.texts(token_id)
            weight, raw = float(trace.weight[i]), float(norm[i])
            record = {
                "record": "token", "step": step, "sample_id": _sample_id(batch, row), "position": position,
                "chunk": int(batch["chunk_index"][row, position]),
                "chunk_masked": bool(trace.chunk_masked[i]) if trace.chunk_masked is not None else None,
                "token_id": token_id, "token": text, "token_type": kind, "loss": _round(float(trace.loss[i])),
                "loss_weight": _round(weight), "grad_norm": _round(weight * raw), "raw_grad_norm": _round(raw),
                "alignment": _round(_cosine(float(grads.dot[i]), raw, g_norm)),
            }
            if with_steps:
                record["step_losses"] = [_round(float(v)) for v in trace.step_loss[:, i]]
                record["step_grad_norms"] = [_round(weight * float(v)) for v in step_norm[:, i]]
                record["step_alignments"] = [_round(_cosine(float(d), float(n), g_norm))
                                             for d, n in zip(grads.step_dot[:, i], step_norm[:, i])]
            records.append(record)
        return records


def _cosine(dot: float, norm: float, other: float) -> float | None:
    if norm <= 0 or other <= 0:
        return None
    return max(-1.0, min(1.0, dot / (norm * other)))


def _sample_id(batch: dict, row: int) -> int:
    return int(batch["sample_id"][row]) if "sample_id" in batch else row


def build_grad_tracer(trainer) -> TokenGradTracer:
    """The tracer of a training run; a parameter selection that cannot be used is a UsageError."""
    acc, args = trainer.accelerator, trainer.args
    if acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise UsageError("--token_grad_trace_every needs the whole parameters on the main process; parameter "
                         "sharding (FSDP, DeepSpeed) does not keep them there: trace with DDP or one process")
    try:
        return TokenGradTracer(acc.unwrap_model(trainer.model), args.model.objective, trainer.objective,
                               trainer.tokenizer, args.train.output_dir, args.train.token_grad_trace_every,
                               args.train.token_grad_trace_params, write=acc.is_main_process)
    except TraceSelectionError as error:
        raise UsageError(str(error)) from None
