"""LLaDATRMHybrid: a (frozen) LLaDA backbone + the recursive refinement head, trained with deep supervision.

One vectorised pass covers every chunk and every refinement step: the backbone and the head both run
block-causally (chunk k sees the prompt and chunks 0..k), which equals running the prompt plus chunks 0..k
separately for each k. Logits are only formed at supervised positions, so memory is set by the reasoning
tokens, not by the whole sequence. A frozen backbone runs in eval mode under `no_grad`, and checkpoints of it
hold the head and a config naming the backbone, never the backbone's weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from llada_trm.data.collator import positions_in_masked_chunks
from llada_trm.model.attention import clean_context_pair
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.head import RecursiveRefinementHead, RefinementState
from llada_trm.model.hybrid_outputs import HybridOutput, StepScores, micro_batch_metrics
from llada_trm.model.integrity import check_safetensors, write_manifest
from llada_trm.model.lm_head_loss import lm_head_scores
from llada_trm.model.loading import load_hybrid_config
from llada_trm.model.modeling_llada import CheckpointMismatchError, LLaDAModelLM, LLaDAOutput, attention_context
from llada_trm.model.losses import chunk_token_weights, hybrid_loss

HEAD_WEIGHTS = "model.safetensors"


class LLaDATRMHybrid(PreTrainedModel):
    config: HybridConfig
    config_class = HybridConfig
    base_model_prefix = "hybrid"
    _no_split_modules = ["LLaDABlock"]

    def __init__(self, config: HybridConfig, backbone: LLaDAModelLM | None = None):
        super().__init__(config)
        if backbone is None:
            backbone = LLaDAModelLM.from_pretrained(config.backbone_name_or_path)
        config.resolve_head_shape(backbone.config.d_model, backbone.config.n_layers)
        config.validate_architecture()
        self.backbone = backbone
        # The head stays in fp32 whatever the backbone's dtype: it is what gets trained (AdamW on bf16 weights
        # loses small updates); mixed precision comes from autocast.
        self.head = RecursiveRefinementHead(config, backbone.config.d_model).to(device=backbone.device)
        self.set_backbone_frozen(config.freeze_backbone)
        self.post_init()

    def init_weights(self):
        """Nothing to initialise: the backbone comes pretrained and the head initialises itself."""

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Frozen: no backbone weight is trained and the backbone runs in eval mode under no_grad. Unfrozen: the
        backbone runs with gradients; a LoRA backbone (peft) keeps training only its adapters, as peft set it up."""
        self.config.freeze_backbone = frozen
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        elif not hasattr(self.backbone, "peft_config"):
            self.backbone.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()  # no dropout or other training behaviour in a frozen backbone
        return self

    # ------------------------------------------------------------------ forward pieces
    def backbone_pass(self, **inputs) -> LLaDAOutput:
        """The backbone pass the head reads (training and decoding): hidden states, no logits, and the
        `head_reads_layers` layers in `layer_states`. Gradients only into a backbone that trains."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_backbone):
            return self.backbone(**inputs, output_hidden_states=True, return_logits=False,
                                 read_layers=self.config.head_reads_layers)

    def backbone_hidden_states(self, input_ids, attention_mask, chunk_index, position_ids=None,
                               noisy_copy=None) -> Tensor:
        """The backbone's last hidden state (B, L, d_model), after ln_f."""
        return self.backbone_pass(input_ids=input_ids, attention_mask=attention_mask, chunk_index=chunk_index,
                                  position_ids=position_ids, noisy_copy=noisy_copy).last_hidden_state

    def head_context(self, hidden: Tensor, attention_mask, chunk_index, position_ids=None, past=None,
                     noisy_copy=None):
        batch, length = hidden.shape[:2]
        head_dim = self.config.head_hidden_size // self.config.head_heads
        return attention_context(
            batch, length, head_dim, self.config.head_rope_theta, device=hidden.device,
            attention_mask=attention_mask, chunk_index=chunk_index, position_ids=position_ids, past=past,
            noisy_copy=noisy_copy,
        )

    def step_logits_at(self, hidden: Tensor, y: Tensor) -> Tensor:
        """Logits of one refinement step: the backbone's own LM head on h + out_proj(y)."""
        lm_head_dtype = self.backbone.get_output_embeddings().weight.dtype
        return self.backbone.lm_head((hidden + self.head.out_proj(y)).to(lm_head_dtype))

    def refine_step(self, state: RefinementState, x: Tensor, context, hidden_at: Tensor, positions,
                    with_logits: bool = True, caches=None, collect_caches=None) -> tuple[RefinementState, Tensor | None]:
        """One refinement step, shared by training and decoding: the next state and, `with_logits`, the step's
        logits at `positions` (the backbone's LM head on h + out_proj(y) there).

        positions: an index into (B, L), e.g. a bool mask (B, L) (training: the supervised tokens) or
        (slice(None), slice(-C, None)) (decoding: the masked chunk); hidden_at = hidden[positions], taken once per
        pass. caches / collect_caches: the head's KV caches, see `RecursiveRefinementHead.step`.
        """
        state = self.head.step(state, x, context, caches=caches, collect_caches=collect_caches)
        logits = self.step_logits_at(hidden_at, state.y[positions]) if with_logits else None
        return state, logits

    def draft_input(self, draft_tokens: Tensor) -> Tensor:
        """(..., ) token ids -> (..., head width): draft_proj of their backbone input embeddings. The embeddings
        are detached: a draft is a discrete choice, and only draft_proj learns how to read it."""
        embeddings = self.backbone.get_input_embeddings()(draft_tokens).detach()
        return self.head.draft_proj(embeddings.to(self.head.draft_proj.weight.dtype))

    def masked_inputs(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) bool: the positions that hold the mask token; never a padding column (attention 0)."""
        is_mask = input_ids == self.backbone.config.mask_token_id
        return is_mask if attention_mask is None else is_mask & attention_mask.bool()

    def draft_positions(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor | None:
        """(B, L) bool: where draft feedback may enter, the masked inputs (None: off)."""
        return self.masked_inputs(input_ids, attention_mask) if self.config.draft_feedback else None

    def step_scores_at(self, hidden: Tensor, y: Tensor, targets: Tensor | None) -> StepScores:
        """`StepScores.of_logits(step_logits_at(hidden, y), targets)` through the fused, chunked LM-head loss: no
        (N, V) tensor."""
        weight = self.backbone.get_output_embeddings().weight
        return StepScores.of_token_scores(lm_head_scores((hidden + self.head.out_proj(y)).to(weight.dtype), weight, targets))

    def narrowed_step_scores(self, hidden: Tensor, y: Tensor, targets: Tensor | None, rows: Tensor) -> StepScores:
        """`step_scores_at` of the (N,) positions at `rows` only, spread back to N (`StepScores.spread`)."""
        part = self.step_scores_at(hidden[rows], y[rows], targets[rows] if targets is not None else None)
        return part.spread(rows, hidden.shape[0])

    def backbone_scores(self, hidden_scored: Tensor, targets: Tensor | None, scored: Tensor | None,
                        return_logits: bool) -> StepScores:
        """The backbone alone at the N scored positions, without gradient; where the last step was scored only in
        part (`scored`, (N,) bool), there only: its LM head is as costly as a step's."""
        with torch.no_grad():
            if return_logits:
                return StepScores.of_logits(self.backbone.lm_head(hidden_scored), targets)
            weight = self.backbone.get_output_embeddings().weight
            if scored is None:
                return StepScores.of_token_scores(lm_head_scores(hidden_scored, weight, targets))
            rows = scored.nonzero().squeeze(1)
            part = lm_head_scores(hidden_scored[rows], weight, targets[rows] if targets is not None else None)
            return StepScores.of_token_scores(part).spread(rows, hidden_scored.shape[0])

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        chunk_index: Tensor | None = None,
        labels: Tensor | None = None,
        chunk_is_masked: Tensor | None = None,
        position_ids: Tensor | None = None,
        return_logits: bool = False,
    ) -> HybridOutput:
        """All chunks, all `max_recursive_steps` steps, one pass. Supervised positions are those with a label
        (or, without labels, every reasoning position)."""
        if chunk_index is None:
            raise ValueError("LLaDATRMHybrid.forward needs `chunk_index` (from ChunkMaskingCollator)")
        supervised = labels != -100 if labels is not None else chunk_index >= 0
        targets = labels[supervised] if labels is not None else None
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, chunk_index=chunk_index,
                      position_ids=position_ids)
        # Where the scores are taken in the model's input, in the order of `supervised`: (rows, columns).
        if self.config.clean_context:
            inputs, scored = self.clean_context_inputs(input_ids, attention_mask, chunk_index, labels, position_ids,
                                                       drop_unread=all(self.narrowed_steps(return_logits)))
        else:
            scored = supervised.nonzero(as_tuple=True)
        backbone_out = self.backbone_pass(**inputs)
        hidden = backbone_out.last_hidden_state
        # Padding never counts as masked: a position left out of the packed layout reads column 0.
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        per_step = self.refine_supervised(hidden, attention, inputs["chunk_index"], scored, targets,
                                          inputs["position_ids"], return_logits, inputs.get("noisy_copy"),
                                          self.draft_positions(ids, attention), self.masked_inputs(ids, attention),
                                          backbone_out.layer_states)
        backbone = self.backbone_scores(hidden[scored].detach(), targets, per_step[-1].scored, return_logits)
        return self._assemble_output(
            per_step, backbone, supervised=supervised, chunk_index=chunk_index, chunk_is_masked=chunk_is_masked,
            position_is_masked=self.masked_inputs(input_ids), labels=labels,
        )

    def narrowed_steps(self, return_logits: bool = False) -> list[bool]:
        """Per refinement step, whether it is scored at masked inputs only: the steps before the last by
        `intermediate_step_positions`, the last by `final_step_positions` in training; never with `return_logits`
        (full logits are asked for)."""
        config = self.config
        if return_logits:
            return [False] * config.max_recursive_steps
        before_last = [config.intermediate_step_positions == "masked"] * (config.max_recursive_steps - 1)
        return before_last + [config.final_step_positions == "masked" and self.training]

    def clean_context_inputs(self, input_ids, attention_mask, chunk_index, labels, position_ids=None,
                             drop_unread: bool = False) -> tuple[dict, tuple[Tensor, Tensor]]:
        """Backbone inputs (B, L + M) of clean-context training: the clean sequence (labels filled in), then a
        noisy copy of the collator's chunks that hold a mask token (model/attention.py), so a masked chunk sees
        the prompt and the clean chunks before it, as the chunk decoder shows it. An unmasked chunk has no copy:
        it is scored in the clean sequence, where it sees what its copy would. Returns the inputs and the
        (rows, columns) of the supervised positions (labels != -100, in their order) in them.

        drop_unread (when only the copies are scored): the clean positions from a row's last copied chunk on, and
        padding, are read by no scored position and are left out; each row is then packed to (B, W), W the longest
        row's kept positions plus copies. A left-out position's column is 0 (it is never scored)."""
        if labels is None:
            raise ValueError("clean_context needs `labels`: the clean copy is built from them")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        clean = labels.where(labels != -100, input_ids)
        is_mask = self.masked_inputs(input_ids) & (chunk_index >= 0)
        chunk_has_mask = torch.zeros(input_ids.shape[0], max(int(chunk_index.max()) + 1, 1), device=input_ids.device)
        chunk_has_mask = chunk_has_mask.scatter_add_(1, chunk_index.clamp(min=0), is_mask.float()) > 0  # (B, K)
        copied = positions_in_masked_chunks(chunk_index, chunk_has_mask)
        kept = None
        if drop_unread:
            chunk_numbers = torch.arange(chunk_has_mask.shape[1], device=input_ids.device)
            last_copied = torch.where(chunk_has_mask, chunk_numbers, -1).max(dim=1).values  # (B,), -1: none
            kept = chunk_index < last_copied[:, None]  # the prompt (-1) and the chunks before the last copied one
        layout = clean_context_pair(clean, input_ids, attention_mask, chunk_index, position_ids, copied, kept)
        rows, columns = (labels != -100).nonzero(as_tuple=True)
        copy_column, clean_column = layout.copy_column[rows, columns], layout.clean_column[rows, columns]
        return layout.inputs, (rows, torch.where(copy_column >= 0, copy_column, clean_column.clamp(min=0)))

    def refine_supervised(
        self, hidden, attention_mask, chunk_index, supervised, targets, position_ids=None, return_logits=False,
        noisy_copy=None, draft_at=None, input_is_mask=None, layer_states=None,
    ) -> list[StepScores]:
        """The head over every chunk for all `max_recursive_steps` steps: each step's scores at the supervised
        positions. Each step is recomputed in the backward pass when `recompute_steps` is on, so activation memory
        does not grow with the number of steps. Without `return_logits` the scores come from the fused LM-head
        loss, outside the recomputed part: it keeps no (N, V) tensor for backward, so there is nothing to gain by
        running it twice.

        supervised: (B, L) bool, or (rows, columns) index tensors (the order of the scores). draft_at (B, L) bool
        (`draft_positions`): with draft feedback, each step's argmax enters the next step's x at the supervised
        positions among them. input_is_mask (B, L) bool: with `intermediate_step_positions` "masked", the steps
        before the last are scored only there, and with `final_step_positions` "masked" the last step too, in
        training (fused path only; the others read CE, probabilities 0, argmax -100). layer_states: what the head
        reads (`backbone_hidden_states`; None: `hidden`)."""
        config = self.config
        if isinstance(supervised, Tensor):
            supervised = supervised.nonzero(as_tuple=True)
        narrow_step = self.narrowed_steps(return_logits)
        narrowed = None  # (M,) indices into the N scored positions: those of the narrowed steps
        if any(narrow_step) and input_is_mask is not None:
            narrowed = input_is_mask[supervised].nonzero().squeeze(1)
        context = self.head_context(hidden, attention_mask, chunk_index, position_ids, noisy_copy=noisy_copy)
        x = self.head.project_in(hidden if layer_states is None else layer_states)
        hidden_sup = hidden[supervised]
        drafted = draft_at[supervised] if draft_at is not None else None  # (N,) which scored tokens feed back
        draft_index = tuple(index[drafted] for index in supervised) if drafted is not None else None

        def one_step(state: RefinementState, draft: Tensor | None) -> tuple[RefinementState, StepScores | None]:
            x_step = x if draft is None else x + draft
            state, logits = self.refine_step(state, x_step, context, hidden_sup, supervised, with_logits=return_logits)
            return state, StepScores.of_logits(logits, targets) if logits is not None else None

        state, draft = self.head.initial_state(x), None
        per_step = []
        for step in range(config.max_recursive_steps):
            if config.detach_between_steps:
                state = state.detached()
            if config.recompute_steps and self.training and torch.is_grad_enabled():
                state, scores = checkpoint(one_step, state, draft, use_reentrant=False)
            else:
                state, scores = one_step(state, draft)
            if scores is None and narrowed is not None and narrow_step[step]:
                scores = self.narrowed_step_scores(hidden_sup, state.y[supervised], targets, narrowed)
            elif scores is None:
                scores = self.step_scores_at(hidden_sup, state.y[supervised], targets)
            if drafted is not None:
                draft = torch.zeros_like(x).index_put(draft_index, self.draft_input(scores.prediction[drafted]).to(x.dtype))
            per_step.append(scores)
        return per_step

    def _assemble_output(
        self, per_step: list[StepScores], backbone: StepScores, *, supervised: Tensor, chunk_index: Tensor,
        chunk_is_masked: Tensor | None, position_is_masked: Tensor, labels: Tensor | None,
    ) -> HybridOutput:
        """The (N,) scores at the supervised positions spread back to (B, L), chunk weights and confidences, and
        with labels the loss and the metrics."""
        config = self.config
        batch, length = supervised.shape

        def spread(values: Tensor, fill: float = 0.0) -> Tensor:  # (N, ...) at supervised positions -> (B, L, ...)
            full = values.new_full((batch, length, *values.shape[1:]), fill)
            return full.masked_scatter(supervised.view(batch, length, *[1] * (values.dim() - 1)), values)

        num_chunks = chunk_is_masked.shape[1] if chunk_is_masked is not None else int(chunk_index.max()) + 1
        num_chunks = max(num_chunks, 1)
        if chunk_is_masked is None:
            chunk_is_masked = torch.zeros(batch, num_chunks, dtype=torch.bool, device=supervised.device)
        chunk_weight = chunk_token_weights(
            chunk_index, chunk_is_masked, config.deep_supervision_weight, config.unmasked_chunk_weight,
            position_is_masked,
        ) * supervised
        step_scored = torch.stack([supervised if step.scored is None else spread(step.scored) for step in per_step])
        confidence = torch.stack(
            [self._chunk_mean(spread(step.max_prob), scored, chunk_index, num_chunks)
             for step, scored in zip(per_step, step_scored)]
        )
        with_logits = backbone.logits is not None
        output = HybridOutput(
            step_token_loss=torch.stack([spread(step.ce) for step in per_step]),
            step_scored=step_scored,
            supervised_mask=supervised,
            masked_positions=position_is_masked & supervised,
            chunk_weight=chunk_weight,
            final_label_prob=spread(per_step[-1].label_prob),
            backbone_token_loss=spread(backbone.ce),
            backbone_label_prob=spread(backbone.label_prob),
            final_predictions=spread(per_step[-1].prediction, fill=-100),
            chunk_confidence=confidence,
            steps_to_confidence=self.steps_to_reach(confidence),
            step_logits=torch.stack([spread(step.logits) for step in per_step]) if with_logits else None,
            backbone_logits=spread(backbone.logits) if with_logits else None,
        )
        if labels is not None:
            output.loss, _ = hybrid_loss(output, config.step_weighting)
            output.metrics = micro_batch_metrics(output, labels, last_scores_all=per_step[-1].scored is None)
        return output

    @staticmethod
    def _chunk_mean(values: Tensor, scored: Tensor, chunk_index: Tensor, num_chunks: int) -> Tensor:
        """Mean of (B, L) values over each chunk's scored tokens -> (B, K) (0 for a chunk with none)."""
        batch = values.shape[0]
        slot = chunk_index.clamp(min=0) + num_chunks * torch.arange(batch, device=values.device)[:, None]
        weight = scored.float()
        sums = torch.zeros(batch * num_chunks, device=values.device).index_add_(0, slot.flatten(), (values * weight).flatten())
        counts = torch.zeros(batch * num_chunks, device=values.device).index_add_(0, slot.flatten(), weight.flatten())
        return (sums / counts.clamp(min=1)).view(batch, num_chunks)

    def steps_to_reach(self, confidence: Tensor) -> Tensor:
        """(S, B, K) per-step chunk confidence -> steps an adaptive decoder would use for each chunk."""
        config = self.config
        after_min = confidence[config.min_recursive_steps - 1 :] >= config.refine_confidence_threshold
        first = after_min.float().argmax(dim=0) + config.min_recursive_steps
        return torch.where(after_min.any(dim=0), first, torch.full_like(first, confidence.shape[0]))

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory, state_dict: dict | None = None) -> None:
        """Head weights + config; the backbone only when it is trained (official layout in `backbone/`). Takes no
        other options (safe_serialization, sharding, ...): a misspelt or unsupported one is a TypeError."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state_dict = state_dict if state_dict is not None else self.state_dict()
        head_state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k.startswith("head.")}
        self.config.backbone_in_checkpoint = not self.config.freeze_backbone
        if self.config.backbone_in_checkpoint:
            backbone_state = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            self.backbone.save_pretrained(directory / "backbone", state_dict=backbone_state)
        save_file(head_state, str(directory / HEAD_WEIGHTS), metadata={"format": "pt"})
        self.config.save_pretrained(directory)
        write_manifest(directory)  # last: a hybrid directory without one is incomplete (from_pretrained refuses it)

    @classmethod
    def from_pretrained(cls, path, backbone: LLaDAModelLM | None = None, dtype: torch.dtype | None = None, **unsupported):
        """Config + head from `path`; the backbone from `backbone/` (if it was trained), the one passed, or the
        one the config names. Move the model with `.to(device)` afterwards."""
        if unsupported:  # never ignore an option silently (device_map, quantisation, ...)
            raise TypeError(f"LLaDATRMHybrid.from_pretrained does not support {sorted(unsupported)}")
        path = Path(path)
        config = load_hybrid_config(path)
        if backbone is None:
            source = path / "backbone" if config.backbone_in_checkpoint else config.backbone_name_or_path
            backbone = LLaDAModelLM.from_pretrained(source, **({"dtype": dtype} if dtype is not None else {}))
        model = cls(config, backbone)
        model.load_head_weights(path / HEAD_WEIGHTS)
        return model

    def load_head_weights(self, weights_file) -> None:
        """Load `head.*` weights from a safetensors file; a missing or unexpected key is an error listing them."""
        weights_file = Path(weights_file)
        if not weights_file.exists() and not weights_file.is_dir():
            raise FileNotFoundError(f"{weights_file} not found: not a hybrid checkpoint directory")
        check_safetensors(weights_file)
        head_state = {k[len("head."):]: v for k, v in load_file(str(weights_file)).items()}
        expected = self.head.state_dict()
        missing, unexpected = sorted(set(expected) - set(head_state)), sorted(set(head_state) - set(expected))
        if missing or unexpected:
            raise CheckpointMismatchError(f"{weights_file}: missing head keys {missing}, unexpected keys {unexpected}")
        wrong = [f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})" for k, v in head_state.items()
                 if v.shape != expected[k].shape]
        if wrong:
            more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
            raise CheckpointMismatchError(f"{weights_file}: mis-shaped head weights: {', '.join(wrong[:3])}{more} "
                                          f"(was the checkpoint trained with other head settings?)")
        self.head.load_state_dict(head_state)

    def num_parameters_by_part(self) -> dict[str, int]:
        return {
            "backbone": sum(p.numel() for p in self.backbone.parameters()),
            "head": sum(p.numel() for p in self.head.parameters()),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
        }

    # ------------------------------------------------------------------ generation
    def generate_with_refinement(self, prompt, **kwargs):
        """Chunk-by-chunk decoding with the refinement head: `inference.chunk_decoding.generate_with_refinement`
        (a `settings=DecodingSettings(...)` and/or its fields as keywords)."""
        from llada_trm.inference.chunk_decoding import generate_with_refinement

        return generate_with_refinement(self, prompt, **kwargs)

    def generate(self, prompt, **kwargs):
        """Plain LLaDA sampling with the backbone alone: `inference.sampler.generate`."""
        from llada_trm.inference.sampler import generate

        return generate(self.backbone, prompt, **kwargs)
