"""The training loop: accelerate for devices, precision, distribution and state; global loss normalisation.

What is notable:
- Global normalisation (docs/architecture.md §6). Each optimiser step takes its whole accumulation window of micro-batches
  first, so N (sum of chunk weights over supervised tokens, every micro-batch on every rank) is known before
  any backward: each micro-batch back-propagates `loss_sum * world_size / N` (DDP averages over ranks).
  Truncation removes tokens only during the forward pass, so the gradients are then rescaled by N / N_kept.
  Gradients therefore do not depend on how the global batch is split into micro-batches or ranks.
- Exact resume: mask draws are a pure function of (seed, epoch, sample_id), per-micro-batch generators of
  (seed, step, micro-batch, rank); accelerate restores optimiser, scheduler, RNG and sampler, and the
  trainer state records the position inside the epoch.
- A window with nothing supervised is an empty step; a non-finite loss or gradient skips the optimiser
  step; `--max_bad_steps` of those in a row stop the run.

Held-out scoring is in training/held_out.py, metrics and the run record in training/run_log.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from llada_trm.data.collator import ChunkMaskingCollator, micro_batch_generator, pad_batch
from llada_trm.data.dataset import PreparedData, prepare_dataset
from llada_trm.model.configuration_hybrid import HybridConfigError
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.loading import load_tokenizer
from llada_trm.model.modeling_llada import LLaDAModelLM
from llada_trm.training import held_out
from llada_trm.training.arguments import RunArguments, UsageError, as_usage_error, hybrid_config
from llada_trm.training.checkpointing import (
    architecture_changes,
    load_checkpoint,
    register_state_hooks,
    resolve_resume,
    save_checkpoint,
)
from llada_trm.training.debug_view import debug_enabled, format_chunk_inspection
from llada_trm.training.grad_trace import build_grad_tracer
from llada_trm.training.objectives import BlockSFTObjective, HybridObjective, LLaDASFTObjective
from llada_trm.training.run_directory import claim_run_directory, precheck_run_directory, release_lock, trim_logs
from llada_trm.training.run_log import MetricsLog, summarise, write_run_config
from llada_trm.training.truncation_log import TruncationLogger

BATCH_COLUMNS = ("input_ids", "attention_mask", "labels", "chunk_index", "sample_id")


class TrainingError(RuntimeError):
    """Training cannot go on (for example: too many non-finite steps in a row)."""


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed (per process)
    empty_steps: int = 0
    skipped_steps: int = 0
    bad_steps_in_a_row: int = 0


def build_model(args: RunArguments):
    m = args.model
    backbone = LLaDAModelLM.from_pretrained(m.model_name_or_path)
    if m.gradient_checkpointing:
        backbone.gradient_checkpointing_enable()
    if m.use_lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UsageError("--use_lora needs the peft package: pip install peft") from None
        backbone = get_peft_model(backbone, LoraConfig(
            r=m.lora_r, lora_alpha=m.lora_alpha, target_modules=["q_proj", "k_proj", "v_proj", "attn_out"]))
    if m.objective != "hybrid":  # llada_sft, block_sft: the backbone alone
        return backbone
    try:  # settings that need the backbone's shape (head_reads_layers) are checked here
        return LLaDATRMHybrid(hybrid_config(m), backbone)
    except HybridConfigError as error:
        raise as_usage_error(error) from None


def make_accelerator(args: RunArguments) -> Accelerator:
    t = args.train
    precision = ("bf16" if torch.cuda.is_available() else "no") if t.mixed_precision == "auto" else t.mixed_precision
    # Several processes and no CUDA (torchrun / accelerate launch on CPU): gloo on CPU.
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_process_cpu,
        mixed_precision=precision,
        log_with=None if t.report_to == "none" else t.report_to,
        project_dir=t.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if args.truncation.enable and accelerator.distributed_type.name == "DEEPSPEED":
        raise UsageError("token truncation rescales gradients after the forward pass, which DeepSpeed does not "
                         "expose; use DDP or FSDP (configs/accelerate/) with truncation")
    return accelerator


class Trainer:
    def __init__(self, args: RunArguments, train_dataset=None, objective=None, collator=None):
        """`train_dataset` (prepared rows), `objective` and `collator` (default: pad only): a program's own stage
        in place of the data and objective the arguments describe (llada_trm.pretrain builds its backbone with
        them); given rows have no held-out split."""
        self.args = args
        m, t = args.model, args.train
        self.accelerator = acc = make_accelerator(args)
        set_seed(t.seed)
        self.say = print if acc.is_main_process else (lambda *a, **k: None)
        # Before anything is loaded: a run directory that cannot be used fails fast.
        precheck_run_directory(t.output_dir, t.resume_from_checkpoint, t.overwrite_output_dir, acc.is_main_process)
        self._refuse_changed_architecture()
        self.tokenizer = load_tokenizer(m.model_name_or_path)
        if train_dataset is None:
            self.train_data, self.eval_data = self._prepare_data()
        else:
            self.train_data, self.eval_data = PreparedData(train_dataset, summary=None), None
        self.model = build_model(args)
        if objective is None:
            self.objective, self.collator, eval_collator = self._objective_and_collators()
        else:
            self.objective = objective
            self.collator = eval_collator = collator or _PadOnly(self.tokenizer.pad_token_id, m.chunk_size)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self.trainable:
            raise UsageError("nothing to train: every parameter is frozen")
        optimizer = torch.optim.AdamW(self.trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
        loader = self._loader(self.train_data.dataset, t.batch_size, True, self.collator)
        self.model, self.optimizer, self.loader = acc.prepare(self.model, optimizer, loader)
        self.eval_loader = (acc.prepare(self._loader(self.eval_data.dataset, t.eval_batch_size or t.batch_size, False,
                                                     eval_collator)) if self.eval_data is not None else None)
        steps_per_epoch = math.ceil(len(self.loader) / t.gradient_accumulation_steps)
        self.total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * steps_per_epoch))
        self.scheduler = get_scheduler(t.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=int(t.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        register_state_hooks(acc)  # the scheduler is saved as JSON by save_checkpoint, not pickled by accelerate
        self.state = TrainerState()
        self.run_id = None  # set when train() claims the run directory
        self.metrics = MetricsLog(acc, t.output_dir)
        self.truncation_log = TruncationLogger(t.output_dir, args.truncation, acc.is_main_process)
        self.fair_eval: dict | None = None  # the last answer_accuracy(), for eval_results.json
        self.frozen_backbone_rows: dict = {}  # the backbone-only rows, reused while the backbone is frozen
        self.train_seconds = 0.0  # wall time inside optimiser steps (no evaluation, no checkpoints), this process
        self.grad_tracer = build_grad_tracer(self) if t.token_grad_trace_every else None

    def _prepare_data(self):
        data, chunk_size = self.args.data, self.args.model.chunk_size
        with self.accelerator.main_process_first():  # the main process fills the datasets cache first
            train_data = prepare_dataset(data, self.tokenizer, chunk_size, data.train_split)
            eval_data = prepare_dataset(data, self.tokenizer, chunk_size, data.eval_split) if data.eval_split else None
        self.say(train_data.summary.format())
        if eval_data is not None:
            self.say(eval_data.summary.format())
        return train_data, eval_data

    def _objective_and_collators(self):
        """The objective, and the collators of the training and the held-out batches."""
        m, seed = self.args.model, self.args.train.seed
        mask_id, pad_id = self.tokenizer.mask_token_id, self.tokenizer.pad_token_id
        if m.objective != "hybrid":
            pad_only = _PadOnly(pad_id, m.chunk_size)
            objective = BlockSFTObjective if m.objective == "block_sft" else LLaDASFTObjective
            return objective(mask_id), pad_only, pad_only

        def masking_collator(seed: int) -> ChunkMaskingCollator:
            return ChunkMaskingCollator(mask_id, pad_id, m.chunk_size, m.mask_probability, seed=seed,
                                        partial_chunk_masking=m.partial_chunk_masking)

        objective = HybridObjective(self.model.config, self.args.truncation, self.args.weighting, mask_id)
        return objective, masking_collator(seed), masking_collator(seed + 1)

    def _loader(self, dataset, batch_size: int, shuffle: bool, collate) -> DataLoader:
        dataset = dataset.select_columns([c for c in BATCH_COLUMNS if c in dataset.column_names])
        generator = torch.Generator().manual_seed(self.args.train.seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator,
                          num_workers=self.args.train.dataloader_num_workers)

    # ------------------------------------------------------------------ one optimiser step
    def train_step(self, window: list[dict]) -> dict:
        acc, t = self.accelerator, self.args.train
        if self.grad_tracer is not None:  # before any backward: the gradient this step will take
            self.grad_tracer.maybe_trace(self, window[0])
        pre_count = acc.reduce(sum(self.objective.pre_count(b) for b in window).to(acc.device), "sum")
        scale = acc.num_processes / pre_count.clamp(min=1e-12)
        loss_sum, kept, tokens, metric_sums, last = 0.0, 0.0, 0, {}, None
        self.model.train()
        for i, batch in enumerate(window):
            generator = self.generator_for(self.state.global_step, i)
            sync = contextlib.nullcontext() if i == len(window) - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                result = self.objective(self.model, batch, generator)
                acc.backward(result.loss_sum * scale)
            loss_sum = loss_sum + result.loss_sum.detach().float()
            kept = kept + result.count
            tokens += int(batch["attention_mask"].sum())
            for key, value in result.metrics.as_dict().items():  # on the device: read once per logging step
                metric_sums[key] = metric_sums.get(key, 0.0) + value / len(window)
            last = (batch, result)
        kept_global = acc.reduce(torch.as_tensor(kept, device=acc.device, dtype=torch.float32), "sum")
        loss_global = acc.reduce(torch.as_tensor(loss_sum, device=acc.device, dtype=torch.float32), "sum")
        record = {"empty": False, "skipped": False, "tokens": tokens * acc.num_processes, **metric_sums}
        if float(kept_global) == 0:
            self.state.empty_steps += 1
            record.update(empty=True, loss=0.0, grad_norm=0.0)
        else:
            if float(kept_global) != float(pre_count):  # truncation dropped tokens after the loss was scaled
                for p in self.trainable:
                    if p.grad is not None:
                        p.grad.mul_(pre_count / kept_global)
            loss = loss_global / kept_global
            grad_norm = acc.clip_grad_norm_(self.trainable, t.max_grad_norm or float("inf"))
            record.update(loss=float(loss), grad_norm=float(grad_norm))
            if torch.isfinite(loss) and torch.isfinite(torch.as_tensor(grad_norm)):
                self.optimizer.step()
                self.state.bad_steps_in_a_row = 0
            else:
                record["skipped"] = True
                self.state.skipped_steps += 1
                self.state.bad_steps_in_a_row += 1
                if self.state.bad_steps_in_a_row >= t.max_bad_steps:
                    raise TrainingError(f"{self.state.bad_steps_in_a_row} optimiser steps in a row had a non-finite "
                                        f"loss or gradient (--max_bad_steps {t.max_bad_steps}); lower the learning rate "
                                        f"or check the data (docs/troubleshooting.md)")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self._after_step(last, record)
        return record

    def _after_step(self, last, record: dict) -> None:
        batch, result = last
        if result.decision is not None:
            truncation = self.truncation_log.maybe_log(
                self.state.global_step, result.decision, batch["sample_id"],
                result.output.step_token_loss[-1].detach(), result.output.supervised_mask)
            if truncation:
                record.update(truncation)
        step, every = self.state.global_step, self.args.train.debug_every
        if debug_enabled() and result.output is not None and (step <= 3 or step % every == 0):
            self.say(format_chunk_inspection(self.tokenizer, batch, result.output, title=f"(step {step})"))

    # ------------------------------------------------------------------ evaluation (training/held_out.py)
    def generator_for(self, step: int, micro: int) -> torch.Generator:
        """The random generator of micro-batch `micro` of optimiser step `step` on this process."""
        acc = self.accelerator
        return micro_batch_generator(self.args.train.seed, step, micro, acc.process_index, acc.device)

    def evaluate(self) -> dict:
        """Eval loss (the training objective on every supervised token: no truncation, no token weights),
        perplexity of the last step, backbone-only loss."""
        return held_out.held_out_loss(self)

    def answer_accuracy(self) -> dict:
        """Fair exact match on the held-out problems (main process): the backbone with LLaDA's sampler and through
        the chunk decoder, and the hybrid with generate_with_refinement. Kept in `self.fair_eval` as well."""
        return held_out.answer_accuracy(self)

    def write_eval_results(self) -> Path | None:
        """`eval_results.json` in the run directory: the last fair evaluation (main process)."""
        return held_out.write_eval_results(self.fair_eval, self.args.train.output_dir,
                                           self.accelerator.is_main_process)

    # ------------------------------------------------------------------ the loop
    def resume(self) -> None:
        t = self.args.train
        checkpoint = resolve_resume(t.resume_from_checkpoint, t.output_dir, say=self.say, run_id=self.run_id)
        if checkpoint is None:
            if t.resume_from_checkpoint:
                self.say(f"--resume_from_checkpoint {t.resume_from_checkpoint}: no checkpoint yet, starting fresh")
                self._trim_logs(0)
            return
        state = load_checkpoint(self.accelerator, checkpoint, self.scheduler)
        try:
            self.state = TrainerState(**state)
        except TypeError:
            raise UsageError(f"{checkpoint}: trainer_state.json does not match this version's fields") from None
        if self.state.global_step > self.total_steps:
            raise UsageError(f"--resume_from_checkpoint {checkpoint} is at step {self.state.global_step}, beyond this "
                             f"run's {self.total_steps} steps; raise --max_steps or resume another checkpoint")
        self._trim_logs(self.state.global_step)
        self.say(f"resumed from {checkpoint} at step {self.state.global_step}")

    def _refuse_changed_architecture(self) -> None:
        """A resume whose hybrid flags change the model or its recursion stops here, before data or model load."""
        t, m = self.args.train, self.args.model
        if m.objective != "hybrid" or not t.resume_from_checkpoint:
            return
        checkpoint = resolve_resume(t.resume_from_checkpoint, t.output_dir, say=lambda *_: None)
        if checkpoint is None:
            return
        changes = architecture_changes(checkpoint, hybrid_config(m))
        if changes:
            name, saved, current = changes[0]
            raise UsageError(f"--resume_from_checkpoint {checkpoint} was saved with --{name} {saved}, this run has "
                             f"--{name} {current}: resume with the saved value, or start a new run")

    def _trim_logs(self, step: int) -> None:
        if self.accelerator.is_main_process:
            trim_logs(self.args.train.output_dir, step)
        self.accelerator.wait_for_everyone()

    def windows(self):
        """Yield accumulation windows of micro-batches, epoch after epoch, from the recorded position."""
        g = self.args.train.gradient_accumulation_steps
        while True:
            self.loader.set_epoch(self.state.epoch)
            if hasattr(self.collator, "set_epoch"):
                self.collator.set_epoch(self.state.epoch)
            skip = self.state.batches_in_epoch
            iterator = iter(self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader)
            while True:
                window = [b for _, b in zip(range(g), iterator)]
                if not window:
                    break
                self.state.batches_in_epoch += len(window)
                yield window
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    def save(self) -> Path:
        return save_checkpoint(self.accelerator, self.model, self.tokenizer, asdict(self.state),
                               self.args.train.output_dir, self.args.train.save_total_limit,
                               scheduler=self.scheduler, run_id=self.run_id)

    def train(self, until_step: int | None = None) -> dict:
        """Train to the end of the schedule, or stop (with a checkpoint) after `until_step` optimiser steps.
        The run directory is claimed (ownership, lock) for the duration."""
        t = self.args.train
        self.run_id, lock = claim_run_directory(t.output_dir, t.resume_from_checkpoint, t.overwrite_output_dir,
                                                self.accelerator, say=self.say,
                                                current_run=self.run_id)
        try:
            return self._train_claimed(until_step)
        finally:
            release_lock(lock)

    def _train_claimed(self, until_step: int | None) -> dict:
        t, acc = self.args.train, self.accelerator
        stop_at = min(self.total_steps, until_step or self.total_steps)
        self.resume()
        self._write_run_config()
        if t.report_to != "none":
            acc.init_trackers("llada-trm", config={"output_dir": t.output_dir})
        progress = tqdm(total=self.total_steps, initial=self.state.global_step, disable=not acc.is_main_process,
                        desc="training")
        window_log, started = [], time.time()
        windows = self.windows()
        checkpoint, last_eval = None, {}
        while self.state.global_step < stop_at:
            began = time.perf_counter()
            record = self.train_step(next(windows))
            self.train_seconds += time.perf_counter() - began
            window_log.append(record)
            step = self.state.global_step
            elapsed = max(time.time() - started, 1e-9)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{sum(r['tokens'] for r in window_log) / elapsed:.0f}")
            if step % t.logging_steps == 0 or step == stop_at:
                self.metrics.write(summarise(window_log, self.state, self.scheduler.get_last_lr()[0], elapsed))
                window_log, started = [], time.time()
            if t.eval_steps and step % t.eval_steps == 0 and self.eval_loader is not None:
                last_eval = self._evaluate_and_record()
                self.say(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()))
            if t.save_steps and step % t.save_steps == 0:
                checkpoint = self.save()
        progress.close()
        if checkpoint is None or not checkpoint.name.endswith(f"-{self.state.global_step}"):
            checkpoint = self.save()
        if self.eval_loader is not None and not (t.eval_steps and self.state.global_step % t.eval_steps == 0):
            last_eval = self._evaluate_and_record()
        final_model = self._export_final(checkpoint)
        self.write_eval_results()
        acc.end_training()
        return {"checkpoint": str(checkpoint), "model": str(final_model), "state": asdict(self.state), **last_eval}

    def _evaluate_and_record(self) -> dict:
        scores = {**self.evaluate(), **self.answer_accuracy()}
        self.metrics.write({"step": self.state.global_step, "train_seconds": self.train_seconds, **scores})
        return scores

    def _write_run_config(self) -> None:
        if self.accelerator.is_main_process:
            write_run_config(self.args, self.accelerator.num_processes)
            self.say(self.args.truncation.describe())

    def _export_final(self, checkpoint: Path) -> Path:
        """Copy the checkpoint's loadable model to output_dir/model (atomically replaced)."""
        final = Path(self.args.train.output_dir) / "model"
        if self.accelerator.is_main_process:
            staging = final.with_name(".tmp-model")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(checkpoint / "model", staging)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        self.accelerator.wait_for_everyone()
        return final


class _PadOnly:
    """Collator of the backbone objectives (llada_sft, block_sft): padding only (the objective masks tokens itself)."""

    def __init__(self, pad_token_id: int, chunk_size: int):
        self.pad_token_id, self.chunk_size = pad_token_id, chunk_size

    def __call__(self, features):
        return pad_batch(features, self.pad_token_id, self.chunk_size)
