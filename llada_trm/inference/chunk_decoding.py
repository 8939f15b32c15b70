"""Chunk-by-chunk decoding with the recursive refinement head (`generate_with_refinement`).

A new chunk starts as `chunk_size` mask tokens. The backbone encodes it block-causally against the KV cache
of the prompt and the committed chunks, the head refines it for an adaptive number of steps per row, and the
chunk is committed. The committed chunk is then re-encoded as an ordinary unmasked chunk, through the backbone
and through *all* refinement steps of the head, because that is how context chunks are seen in training: the
vectorised pass runs every chunk through the full recursion, block-causally.

Notable:
- the re-encoding of a committed block (the prompt, then each chunk) shares one pass with the decoding of the
  next masked chunk: block-causal attention keeps the block blind to the chunk after it, so this is exact and
  saves a backbone pass and most head calls per chunk;
- the head keeps one KV cache per call of its tiny transformer: call c of a masked chunk attends to the keys
  call c produced for the context, exactly as in the vectorised training pass;
- caches are immutable, so every refinement step and decode round of a chunk reads the same context;
- rows are independent: each row keeps the logits of the step at which it stopped refining, and finished rows
  leave the batch (their caches are dropped), so a batch decodes as each row would alone;
- `use_cache=False` re-runs the whole sequence for every chunk: slow, but the reference the cache must equal;
- the mask token is never committed: a committed chunk holding one would look like a masked chunk;
- `commit_threshold` decodes a chunk in as many rounds as its confidences need (Fast-dLLM's rule); later rounds
  run only the rows whose chunk still holds a mask token;
- the decoder counts the backbone row-passes it runs (`RefinementOutput.backbone_row_passes`), the cost side of
  tokens per forward pass (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from llada_trm.data.layout import ANSWER_CLOSE
from llada_trm.inference.decoding_settings import DecodingSettings, Vocabulary, decoding_vocabulary
from llada_trm.inference.prompts import left_pad, new_token_budgets, prompt_token_lists
from llada_trm.inference.sampler import PassCounter, commit_above_threshold, commit_top_k, propose, transfer_schedule
from llada_trm.model.attention import KVCache
from llada_trm.model.head import RefinementState


@dataclass
class ChunkTrace:
    chunk: int  # reasoning chunk index
    round: int  # decode round inside the chunk (0 .. decode_steps_per_chunk - 1)
    steps: int  # refinement steps used; 0 = backbone alone
    confidence: list[float]  # chunk confidence after each step (the backbone's when steps == 0)


def format_trace(trace: list[ChunkTrace]) -> str:
    """One row's trace, a line per chunk and round: refinement steps taken and the confidence after each."""
    lines = []
    for entry in trace:
        confidence = ", ".join(f"{c:.3f}" for c in entry.confidence)
        round_note = f" round {entry.round}" if entry.round else ""
        lines.append(f"  chunk {entry.chunk}{round_note}: {entry.steps} steps, confidence [{confidence}]")
    return "\n".join(lines)


@dataclass
class RefinementOutput:
    sequences: Tensor  # (B, T): left-padded prompt, generated tokens, pad after each row's end
    new_tokens: list[list[int]]  # per row, the generated tokens (without the stopping EOS)
    texts: list[str] | None  # per row, the decoded new tokens (with a tokenizer)
    trace: list[list[ChunkTrace]] | None  # per row, one entry per chunk and decode round (return_trace)
    backbone_row_passes: int = 0  # backbone forwards of the run, each counted by its rows


@dataclass
class Caches:
    """The context of the next chunk: the backbone's cache and one head cache per call of f (None: no head)."""

    backbone: KVCache
    head: list[KVCache] | None

    def select(self, rows: Tensor) -> "Caches":
        head = [cache.select_batch(rows) for cache in self.head] if self.head is not None else None
        return Caches(self.backbone.select_batch(rows), head)


# ------------------------------------------------------------------------------------------ model passes


def drop_last(cache: KVCache, n: int) -> KVCache:
    """The cache without its last n positions (the masked chunk that shared a pass with the block encoded)."""
    return KVCache([k[:, :, :-n] for k in cache.keys], [v[:, :, :-n] for v in cache.values],
                   cache.key_blocks[:, :-n], cache.key_is_real[:, :-n])


def chunk_confidence(logits: Tensor) -> Tensor:
    """(n, C, V) -> (n,): mean over the chunk's tokens of the max softmax probability."""
    return logits.float().softmax(dim=-1).amax(dim=-1).mean(dim=-1)


class PassKind(Enum):
    """What one model pass of the decoder covers. The decoder says which; the pass never reads it off shapes."""

    BLOCK_AND_CHUNK = "block_and_chunk"  # the block committed last (first the prompt) + the masked chunk
    CHUNK = "chunk"  # a later decode round: the masked chunk alone against the caches
    WHOLE_SEQUENCE = "whole_sequence"  # no cache: the prompt, every committed chunk and the masked chunk

    @property
    def extends_cache(self) -> bool:
        """Only the first round of a chunk appends a block (the prompt, or the chunk committed last) to the caches."""
        return self is PassKind.BLOCK_AND_CHUNK


@dataclass
class PassResult:
    logits: Tensor  # (n, C, V) of the masked chunk, at the step each row stopped at
    steps: Tensor  # (n,) refinement steps used; 0 = backbone alone
    confidence: Tensor  # (n, S) chunk confidence after every step run
    caches: Caches | None  # `past` extended by the block before the masked chunk (BLOCK_AND_CHUNK passes)


class AdaptiveSteps:
    """Which rows still refine the masked chunk, and what each row keeps: the logits of the step it stopped at.
    A row stops after `min_recursive_steps` once its chunk confidence reaches `refine_confidence_threshold`."""

    def __init__(self, rows: int, settings: DecodingSettings, device):
        self.settings = settings
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.steps = torch.zeros(rows, dtype=torch.long, device=device)
        self.logits: Tensor | None = None
        self.confidences: list[Tensor] = []

    @property
    def all_stopped(self) -> bool:
        return bool(self.done.all())

    def score(self, step: int, logits: Tensor) -> None:
        """Take step `step`'s (n, C, V) logits for the rows still refining, then apply the stopping rule."""
        confidence = chunk_confidence(logits)
        self.confidences.append(confidence)
        self.logits = logits if self.logits is None else torch.where(self.done[:, None, None], self.logits, logits)
        self.steps = torch.where(self.done, self.steps, step)
        self.done |= (step >= self.settings.min_recursive_steps) & (confidence >= self.settings.refine_confidence_threshold)

    def result(self, caches: Caches | None) -> PassResult:
        return PassResult(self.logits, self.steps, torch.stack(self.confidences, dim=1), caches)


def with_draft(model, x_base: Tensor, logits: Tensor, still_masked: Tensor) -> Tensor:
    """The head's input x for the next step: the step's argmax draft (draft_proj of its embeddings) added where
    the masked chunk still holds the mask token (still_masked (n, C, 1)), as in training (model/head.py)."""
    size = still_masked.shape[1]
    draft = model.draft_input(logits.argmax(dim=-1)).to(x_base.dtype) * still_masked
    return torch.cat((x_base[:, :-size], x_base[:, -size:] + draft), dim=1)


def refine_pass(model, ids: Tensor, attention_mask: Tensor, chunk_index: Tensor, past: Caches | None,
                settings: DecodingSettings, kind: PassKind) -> PassResult:
    """One pass over `ids`, which ends with the masked chunk (its last `chunk_size` positions); the chunk is
    refined with adaptive steps per row.

    A BLOCK_AND_CHUNK pass also appends the block before the chunk (the prompt or the chunk committed last) to
    the caches: through the backbone and through every call of all `max_recursive_steps` refinement steps, as an
    unmasked chunk runs in training. Block-causal attention keeps the block independent of the masked chunk, so
    sharing the pass changes nothing for either and saves one backbone pass and the shared head calls per chunk.
    """
    size, extend = model.config.chunk_size, kind.extends_cache
    out = model.backbone_pass(
        input_ids=ids, attention_mask=attention_mask, chunk_index=chunk_index,
        past_key_values=past.backbone if past is not None else None, use_cache=extend,
    )
    hidden = out.last_hidden_state
    masked_chunk = (slice(None), slice(-size, None))  # the last chunk_size positions of every row
    chunk_hidden = hidden[masked_chunk]
    backbone_cache = drop_last(out.cache, size) if extend else None
    if not settings.enable_refinement:
        logits = model.backbone.lm_head(chunk_hidden)
        steps = torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        return PassResult(logits, steps, chunk_confidence(logits)[:, None], Caches(backbone_cache, None) if extend else None)

    past_head = past.head if past is not None else None

    def context_of(length: int):
        return model.head_context(hidden[:, :length], attention_mask[:, :length], chunk_index[:, :length],
                                  past=past_head[0] if past_head else None)

    x = x_base = model.head.project_in(out.layer_states)
    context, state = context_of(ids.shape[1]), model.head.initial_state(x)
    still_masked = None
    if model.config.draft_feedback:
        still_masked = (ids[masked_chunk] == model.backbone.config.mask_token_id)[..., None]  # (n, C, 1)
    rows = AdaptiveSteps(len(ids), settings, ids.device)
    block_only = False  # set once every row has stopped: the block alone then goes on to max_recursive_steps
    head_caches: list[KVCache] | None = [] if extend else None
    for step in range(1, settings.max_recursive_steps + 1):
        if rows.all_stopped and not block_only:
            if not extend:
                break
            block_only, block = True, ids.shape[1] - size
            x, context = x_base[:, :block], context_of(block)
            state = RefinementState(state.y[:, :block], state.z[:, :block], state.steps_done)
        calls: list[KVCache] | None = [] if extend else None
        state, logits = model.refine_step(state, x, context, chunk_hidden, masked_chunk, with_logits=not block_only,
                                          caches=past_head, collect_caches=calls)
        if extend:
            head_caches += calls if block_only else [drop_last(cache, size) for cache in calls]
        if not block_only:
            rows.score(step, logits)
            if still_masked is not None:
                x = with_draft(model, x_base, logits, still_masked)
    return rows.result(Caches(backbone_cache, head_caches) if extend else None)


# ------------------------------------------------------------------------------------------ stopping


def token_stop(tokens: list[int], start: int, eos_id: int | None, answer_close_id: int | None) -> int | None:
    """Tokens to keep when tokens[start:] holds a stop token, else None: EOS ends before itself, `</answer>`
    (one token) after itself."""
    for i in range(start, len(tokens)):
        if tokens[i] == eos_id:
            return i
        if tokens[i] == answer_close_id:
            return i + 1
    return None


def stop_length(tokens: list[int], chunk_start: int, vocabulary: Vocabulary) -> int | None:
    """Tokens to keep when the chunk just committed (tokens[chunk_start:]) ends the row, else None.

    EOS ends a row before itself; `</answer>` after itself (by token id, or by text when it is several tokens).
    """
    stop = token_stop(tokens, chunk_start, vocabulary.eos_id, vocabulary.answer_close_id)
    if stop is not None:
        return stop
    tokenizer = vocabulary.tokenizer
    if vocabulary.answer_close_id is None and tokenizer is not None and ANSWER_CLOSE in tokenizer.decode(tokens):
        for i in range(chunk_start, len(tokens)):
            if ANSWER_CLOSE in tokenizer.decode(tokens[: i + 1]):
                return i + 1
    return None


# ------------------------------------------------------------------------------------------ decoding


class ChunkDecoder:
    """The state of one batched decoding run: active rows, their caches, committed tokens and traces."""

    def __init__(self, model, prompt_ids: Tensor, prompt_mask: Tensor, budgets: list[int],
                 settings: DecodingSettings, vocabulary: Vocabulary, generator: torch.Generator | None):
        """`settings` resolved against the model's config (`DecodingSettings.resolved`)."""
        self.model, self.settings, self.vocabulary, self.generator = model, settings, vocabulary, generator
        self.chunk_size = model.config.chunk_size
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.device = prompt_ids.device
        self.budgets = budgets
        batch = len(budgets)
        self.generated: list[list[int]] = [[] for _ in range(batch)]
        self.keep = list(budgets)  # tokens of each row that end up in the output
        self.trace = [[] for _ in range(batch)] if settings.return_trace else None
        self.active = torch.arange(batch, device=self.device)
        self.passes = PassCounter()
        self.chunks: list[Tensor] = []  # committed chunks (B, C) of the whole batch, pad for finished rows
        # With the cache: `caches` hold everything before `pending`, the block (ids, mask, chunk index) that the
        # next pass appends while it decodes the next chunk. First the prompt, then each committed chunk.
        self.caches: Caches | None = None
        self.pending = (prompt_ids, prompt_mask, torch.full_like(prompt_ids, -1)) if settings.use_cache else None

    def run(self) -> int:
        """Decode chunk by chunk until every row has finished; returns the number of chunks run."""
        size = self.chunk_size
        num_chunks = -(-max(self.budgets) // size)
        for k in range(num_chunks):
            chunk = self.decode_chunk(k)  # (n, C) for the active rows
            if len(self.active) < len(self.budgets):  # finished rows get pad
                full = torch.full((len(self.budgets), size), self.vocabulary.pad_id, dtype=torch.long, device=self.device)
                full[self.active] = chunk
            else:
                full = chunk
            self.chunks.append(full)
            running = self.update_rows(chunk)
            if not any(running):
                return k + 1
            kept = chunk
            if not all(running):  # rows leave the batch; while none does, no cache is copied
                still_running = torch.tensor(running, dtype=torch.bool, device=self.device)
                self.active, kept = self.active[still_running], chunk[still_running]
                if self.settings.use_cache:
                    self.caches = self.caches.select(still_running)
            if self.settings.use_cache:
                self.pending = (kept, torch.ones_like(kept), torch.full_like(kept, k))
        return num_chunks

    def decode_chunk(self, k: int) -> Tensor:
        """Commit chunk k of the active rows: in `decode_steps_per_chunk` rounds, most confident tokens first, or
        by threshold."""
        rounds, size, n = self.settings.decode_steps_per_chunk, self.chunk_size, len(self.active)
        current = torch.full((n, size), self.vocabulary.mask_id, dtype=torch.long, device=self.device)
        if self.settings.commit_threshold is not None:
            return self.decode_chunk_by_threshold(k, current)
        schedule = transfer_schedule(torch.full((n,), size, device=self.device), rounds)  # (n, rounds)
        for r in range(rounds):
            x0, token_confidence = self.propose_round(k, r, current)
            current = commit_top_k(current, x0, token_confidence, schedule[:, r])
        return current

    def decode_chunk_by_threshold(self, k: int, current: Tensor) -> Tensor:
        """Rounds until chunk k has no mask token left, each committing every token at or above the threshold and
        at least the most confident one. The mask token is never proposed, so every round commits at least one
        token and a chunk takes at most chunk_size rounds. Round 0 runs every row (it also appends the block
        before the chunk to the caches); later rounds only the rows with masks left."""
        threshold, mask_id = self.settings.commit_threshold, self.vocabulary.mask_id
        open_caches, open_count = None, len(current)  # the caches of the open rows, and how many they hold
        for r in range(self.chunk_size):
            open_rows = (current == mask_id).any(dim=1)
            if not open_rows.any():
                break
            rows = None if bool(open_rows.all()) else open_rows.nonzero().flatten()
            if rows is not None and self.settings.use_cache and open_count != len(rows):
                # Selecting copies every cache: done once each time the open rows shrink, not every round.
                open_caches, open_count = self.caches.select(rows), len(rows)
            sub = current if rows is None else current[rows]
            x0, token_confidence = self.propose_round(k, r, sub, rows, open_caches)
            committed = commit_above_threshold(sub, x0, token_confidence, threshold)
            current = committed if rows is None else current.index_copy(0, rows, committed)
        return current

    def propose_round(self, k: int, r: int, current: Tensor, rows: Tensor | None = None,
                      caches: Caches | None = None) -> tuple[Tensor, Tensor]:
        """Round r of chunk k: one pass over the active rows (or those at indices `rows`, with `caches` their
        caches), and the proposal (tokens, confidences) for the still-masked positions of `current`."""
        settings, mask_id = self.settings, self.vocabulary.mask_id
        ids, mask, chunk_index, kind = self.model_inputs(k, current, rows)
        result = refine_pass(self.model, ids, mask, chunk_index, self.caches if rows is None else caches, settings, kind)
        self.passes.add(len(ids))
        if kind.extends_cache:
            self.caches, self.pending = result.caches, None
        logits = result.logits.clone()
        logits[..., mask_id] = -torch.inf  # the mask token is never committed
        if self.trace is not None:
            self.record_trace(k, r, result, self.active if rows is None else self.active[rows])
        return propose(logits, current, mask_id, settings.temperature, "low_confidence", self.generator)

    def record_trace(self, k: int, r: int, result: PassResult, rows: Tensor) -> None:
        """One ChunkTrace per row of the pass: steps used and the chunk confidence after each."""
        for row, used, row_confidence in zip(rows.tolist(), result.steps.tolist(), result.confidence.tolist()):
            self.trace[row].append(ChunkTrace(k, r, used, row_confidence[: max(used, 1)]))

    def model_inputs(self, k: int, current: Tensor, rows: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, PassKind]:
        """ids, attention mask and chunk index of the pass that decodes chunk k (for the active rows, or those at
        indices `rows` of them, in a later round), and what kind of pass it is."""
        chunk_index = torch.full_like(current, k)
        if self.settings.use_cache:
            if self.pending is None:  # a later decode round: the chunk alone against the cache
                return current, torch.ones_like(current), chunk_index, PassKind.CHUNK
            ids, mask, block_index = self.pending
            return (torch.cat((ids, current), 1), torch.cat((mask, torch.ones_like(current)), 1),
                    torch.cat((block_index, chunk_index), 1), PassKind.BLOCK_AND_CHUNK)
        # No cache: the prompt, every committed chunk and this one, recomputed.
        rows = self.active if rows is None else self.active[rows]
        ids = torch.cat([self.prompt_ids[rows], *(c[rows] for c in self.chunks), current], dim=1)
        mask = torch.cat([self.prompt_mask[rows], torch.ones(len(rows), (k + 1) * current.shape[1],
                                                              dtype=torch.long, device=self.device)], dim=1)
        reasoning_chunks = torch.arange(k + 1, device=self.device).repeat_interleave(current.shape[1])
        chunk_index = torch.cat([torch.full_like(self.prompt_ids[rows], -1),
                                 reasoning_chunks.expand(len(rows), -1)], dim=1)
        return ids, mask, chunk_index, PassKind.WHOLE_SEQUENCE

    def update_rows(self, chunk: Tensor) -> list[bool]:
        """Record the chunk just decoded for each active row and decide who stops; returns, per active row, whether it goes on."""
        running = []
        for row, chunk_tokens in zip(self.active.tolist(), chunk.tolist()):
            tokens = self.generated[row]
            start = len(tokens)
            tokens.extend(chunk_tokens)
            stop = None if self.settings.ignore_eos else stop_length(tokens, start, self.vocabulary)
            self.keep[row] = min(stop if stop is not None else len(tokens), self.budgets[row])
            running.append(stop is None and len(tokens) < self.budgets[row])
        return running

    def output(self, num_chunks: int) -> RefinementOutput:
        vocabulary = self.vocabulary
        new_tokens = [tokens[:keep] for tokens, keep in zip(self.generated, self.keep)]
        width = self.prompt_ids.shape[1]
        sequences = torch.full((len(new_tokens), width + num_chunks * self.chunk_size), vocabulary.pad_id,
                               dtype=torch.long, device=self.device)
        sequences[:, :width] = self.prompt_ids
        for b, tokens in enumerate(new_tokens):
            sequences[b, width: width + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        texts = None
        if vocabulary.tokenizer is not None:
            texts = [vocabulary.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new_tokens]
        return RefinementOutput(sequences, new_tokens, texts, self.trace, self.passes.backbone_row_passes)


@torch.no_grad()
def generate_with_refinement(
    model,
    prompt,
    tokenizer=None,
    settings: DecodingSettings | None = None,
    generator: torch.Generator | None = None,
    **overrides,
) -> RefinementOutput:
    """Decode reasoning chunk by chunk with an `LLaDATRMHybrid`.

    prompt: a question or prompt text (str, or a list of them; needs `tokenizer`), or token ids (a list, a list
    of lists, or a LongTensor (L,) / (B, L)). A text without the marker is rendered as a question.
    settings: a `DecodingSettings` (default: its defaults); `overrides` are its field names as keywords, e.g.
    `max_length=100, temperature=0.7`, and replace those fields.
    generator: draws the samples when temperature > 0.
    """
    decoding = (settings if settings is not None else DecodingSettings()).with_overrides(**overrides)
    decoding = decoding.resolved(model.config)
    vocabulary = decoding_vocabulary(model.backbone.config, tokenizer)
    chunk_size = model.config.chunk_size
    rows = prompt_token_lists(prompt, tokenizer, vocabulary.pad_id)
    budgets = new_token_budgets(rows, decoding.max_length, decoding.max_new_tokens, chunk_size,
                                model.backbone.config.max_sequence_length)
    prompt_ids, prompt_mask = left_pad(rows, chunk_size, vocabulary.pad_id, model.device)
    was_training = model.training
    model.eval()
    try:
        decoder = ChunkDecoder(model, prompt_ids, prompt_mask, budgets, decoding, vocabulary, generator)
        return decoder.output(decoder.run())
    finally:
        model.train(was_training)
