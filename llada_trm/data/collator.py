"""Batch padding and whole-chunk masking of prepared samples.

`pad_batch` right-pads prepared samples (already whole chunks, see data.dataset.layout_sample) with whole pad chunks.
`ChunkMaskingCollator` then replaces whole reasoning chunks by the mask token, each with probability
`mask_probability`, and at least one per sample that has reasoning. The draw for a sample depends only on
(seed, epoch, sample_id): a resumed run replays the same masks, and neither batch composition nor the number
of workers or processes changes them.
"""

from __future__ import annotations

import hashlib
import warnings

import torch


def pad_batch(features: list[dict], pad_token_id: int, chunk_size: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: pad id, attention 0, labels -100, chunk_index -1.

    Returns input_ids, attention_mask, labels, chunk_index (B, L) and num_chunks (B,), plus sample_id (B,) when
    every feature has one.
    """
    if not features:
        raise ValueError("pad_batch needs at least one feature")
    lengths = [len(f["input_ids"]) for f in features]
    if any(n % chunk_size for n in lengths):
        raise ValueError(f"sample lengths {lengths} are not all multiples of chunk_size {chunk_size}; prepare the "
                         f"data with the same chunk_size (llada_trm.data.dataset.prepare_dataset)")
    width = max(lengths)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100, "chunk_index": -1}
    batch = {
        name: torch.tensor([list(f[name]) + [value] * (width - len(f[name])) for f in features], dtype=torch.long)
        for name, value in fill.items()
    }
    batch["num_chunks"] = batch["chunk_index"].amax(dim=1).clamp(min=-1) + 1
    if all("sample_id" in f for f in features):
        batch["sample_id"] = torch.tensor([int(f["sample_id"]) for f in features], dtype=torch.long)
    return batch


def positions_in_masked_chunks(chunk_index: torch.Tensor, chunk_is_masked: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the reasoning positions whose chunk was drawn for masking.

    chunk_index (B, L) long, -1 outside reasoning; chunk_is_masked (B, K) bool. With whole-chunk masking these
    are exactly the positions holding the mask token; with partial masking a superset of them.
    """
    in_chunk = chunk_index >= 0
    return torch.gather(chunk_is_masked.bool(), 1, chunk_index.clamp(min=0)) & in_chunk


def mask_seed(seed: int, epoch: int, sample_id: int) -> int:
    """A 64-bit generator seed mixing the three numbers (hash-mixed, so neighbouring ids are unrelated draws)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def micro_batch_generator(seed: int, step: int, micro: int, rank: int, device) -> torch.Generator:
    """The random generator of micro-batch `micro` of optimiser step `step` on process `rank` (the objectives'
    noise: LLaDA's masking ratio, dropped chunks); the gradient trace replays it."""
    return torch.Generator(device=device).manual_seed(mask_seed(seed, step, micro * 65536 + rank) % (2**63))


def draw_masked_chunks(num_chunks: int, mask_probability: float, seed: int, epoch: int, sample_id: int,
                       partial_chunk_size: int | None = None) -> torch.Tensor:
    """(num_chunks,) bool: each chunk masked with `mask_probability`; if none was drawn, one uniformly.

    With `partial_chunk_size` C: (num_chunks, C) bool instead, the masked positions. Each masked chunk draws its
    own rate r ~ U(0, 1) and masks each of its tokens with probability r, at least one; other chunks are clear.
    The chunk draw comes first from the same generator, so both modes mask the same chunks.
    """
    generator = torch.Generator().manual_seed(mask_seed(seed, epoch, sample_id))
    masked = torch.rand(num_chunks, generator=generator) < mask_probability
    if num_chunks > 0 and mask_probability > 0 and not masked.any():
        masked[torch.randint(num_chunks, (1,), generator=generator)] = True
    if partial_chunk_size is None:
        return masked
    rate = torch.rand(num_chunks, 1, generator=generator)
    positions = torch.rand(num_chunks, partial_chunk_size, generator=generator) < rate
    forced = torch.randint(partial_chunk_size, (num_chunks,), generator=generator)
    positions[torch.arange(num_chunks), forced] = True  # at least one masked token per masked chunk
    return positions & masked[:, None]


class ChunkMaskingCollator:
    """Pads a batch with whole pad chunks and masks whole reasoning chunks; labels keep the ground truth.

    Output: input_ids, labels, attention_mask, chunk_index (B, L) long; chunk_is_masked (B, K_max) bool (False
    for chunks a sample does not have); num_chunks, sample_id (B,) long.

    partial_chunk_masking: inside each masked chunk only a random fraction of the tokens is masked (a rate drawn
    per chunk), as a chunk looks between the rounds of multi-round chunk decoding. `chunk_is_masked` still marks
    the chunks that were drawn; which positions are masked is in `input_ids` (the mask token).
    """

    def __init__(self, mask_token_id: int, pad_token_id: int, chunk_size: int = 16, mask_probability: float = 0.3,
                 seed: int = 0, partial_chunk_masking: bool = False):
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if not 0.0 <= mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
        if mask_token_id is None or pad_token_id is None:
            raise ValueError(f"mask_token_id and pad_token_id are required, got {mask_token_id!r}, {pad_token_id!r}")
        if mask_probability == 0.0:
            warnings.warn("mask_probability=0: no chunk is ever masked, so every chunk is seen as ground truth and "
                          "the masked-chunk loss is empty", stacklevel=2)
        self.mask_token_id, self.pad_token_id = mask_token_id, pad_token_id
        self.chunk_size, self.mask_probability, self.seed = chunk_size, mask_probability, seed
        self.partial_chunk_masking = partial_chunk_masking
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not all("sample_id" in f for f in features):
            raise ValueError("every feature needs a 'sample_id' (prepare_dataset adds it): masks are keyed on it")
        batch = pad_batch(features, self.pad_token_id, self.chunk_size)
        max_chunks = int(batch["num_chunks"].max())
        size = self.chunk_size
        positions = torch.zeros(len(features), max_chunks, size, dtype=torch.bool)  # masked positions, by chunk
        for row, (num_chunks, sample_id) in enumerate(zip(batch["num_chunks"].tolist(), batch["sample_id"].tolist())):
            drawn = draw_masked_chunks(num_chunks, self.mask_probability, self.seed, self.epoch, sample_id,
                                       size if self.partial_chunk_masking else None)
            positions[row, :num_chunks] = drawn if self.partial_chunk_masking else drawn[:, None]
        if max_chunks > 0:
            # Reasoning chunk k covers the positions with chunk_index k, in order: offset inside it = rank.
            in_reasoning = batch["chunk_index"] >= 0
            chunk = batch["chunk_index"].clamp(min=0)
            offset = (torch.arange(batch["chunk_index"].shape[1]) - in_reasoning.long().argmax(dim=1, keepdim=True)) % size
            position_masked = positions[torch.arange(len(features))[:, None], chunk, offset] & in_reasoning
            batch["input_ids"] = batch["input_ids"].masked_fill(position_masked, self.mask_token_id)
        batch["chunk_is_masked"] = positions.any(dim=2)
        return batch
