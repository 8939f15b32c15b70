"""How `generate_with_refinement` decodes (`DecodingSettings`) and the token ids it needs (`Vocabulary`).

`DecodingSettings` is the one settings type: its fields are the keywords of `generate_with_refinement`, and
`resolved(config)` fills in the model config's refinement defaults and validates every field. `Vocabulary` holds
what comes from the model and the tokenizer, not from the user: the mask, EOS and pad ids and `</answer>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from llada_trm.data.layout import ANSWER_CLOSE
from llada_trm.inference.prompts import single_token_id


def _setting(default, help: str, aliases: tuple[str, ...] = ()):
    """A decoding setting: its one default and help, which the programs' flags take (cli.add_decoding_flags)."""
    return field(default=default, metadata={"help": help, "aliases": aliases})


@dataclass
class DecodingSettings:
    """How `generate_with_refinement` decodes. None: the model config's value (refinement settings). Each field is
    also the flag `--<name>` of the programs that decode (a boolean that is on by default: `--no_<name>`).

    commit_threshold: above 1 commits one token a round; 0 the whole chunk in one round.
    """

    max_length: int = _setting(512, "total tokens per row, prompt included (at most the model's max_sequence_length)")
    max_new_tokens: int | None = _setting(None, "new tokens per row; when set, it wins over max_length")
    enable_refinement: bool = _setting(True, "refine with the head; off: decode with the backbone's logits alone "
                                             "(same chunk-by-chunk schedule)", aliases=("--no_refinement",))
    use_cache: bool = _setting(True, "KV caches; off recomputes the whole sequence for every chunk (the reference "
                                     "the cached path equals)")
    temperature: float = _setting(0.0, "0 commits the argmax, otherwise tokens are sampled")
    decode_steps_per_chunk: int = _setting(1, "rounds per chunk; each commits the most confident still-masked tokens")
    commit_threshold: float | None = _setting(None, "instead of a fixed number of rounds, each round commits every "
                                                    "still-masked token whose confidence is >= it (and at least the "
                                                    "most confident one) until the chunk has no mask left")
    refine_confidence_threshold: float | None = _setting(None, "a row stops refining a chunk at this confidence "
                                                               "(default: the model's)")
    min_recursive_steps: int | None = _setting(None, "refinement steps before stopping is allowed (default: the model's)")
    max_recursive_steps: int | None = _setting(None, "most refinement steps per chunk (default: the model's)")
    return_trace: bool = _setting(False, "also return, per row, the steps and confidences of every chunk and round",
                                  aliases=("--trace",))
    ignore_eos: bool = _setting(False, "keep decoding to the length limit after EOS or `</answer>` (benchmarks)")

    def with_overrides(self, **overrides) -> "DecodingSettings":
        """A copy with some fields changed; an unknown name is a TypeError naming it."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown decoding setting(s) {unknown}; DecodingSettings has "
                            f"{[f.name for f in fields(self)]}")
        return replace(self, **overrides)

    def resolved(self, config) -> "DecodingSettings":
        """The settings with the model config's defaults filled in, checked against it (`config`: a HybridConfig).
        Every decoding setting is validated here."""
        chunk_size = config.chunk_size
        min_steps = config.min_recursive_steps if self.min_recursive_steps is None else self.min_recursive_steps
        max_steps = config.max_recursive_steps if self.max_recursive_steps is None else self.max_recursive_steps
        threshold = self.refine_confidence_threshold
        threshold = config.refine_confidence_threshold if threshold is None else threshold
        rounds, temperature, max_new_tokens = self.decode_steps_per_chunk, self.temperature, self.max_new_tokens
        if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= chunk_size:
            raise ValueError(f"decode_steps_per_chunk must be an integer from 1 to chunk_size ({chunk_size}), "
                             f"got {rounds!r}")
        if not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not (isinstance(min_steps, int) and isinstance(max_steps, int) and 1 <= min_steps <= max_steps):
            raise ValueError(f"need 1 <= min_recursive_steps <= max_recursive_steps, got {min_steps} and {max_steps}")
        if not threshold >= 0:
            raise ValueError(f"refine_confidence_threshold must be >= 0, got {threshold}")
        commit = self.commit_threshold
        if commit is not None and (isinstance(commit, bool) or not isinstance(commit, (int, float))
                                   or not 0 <= commit < float("inf")):
            raise ValueError(f"commit_threshold must be a finite number >= 0 or None, got {commit!r}")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        return replace(self, min_recursive_steps=min_steps, max_recursive_steps=max_steps,
                       refine_confidence_threshold=float(threshold), temperature=float(temperature),
                       commit_threshold=None if commit is None else float(commit))


@dataclass
class Vocabulary:
    """The token ids one decoding run needs, from the model's backbone config and the tokenizer."""

    mask_id: int
    eos_id: int | None
    pad_id: int
    answer_close_id: int | None  # `</answer>` as one token, else found in the decoded text
    tokenizer: object | None  # decodes texts and a `</answer>` spread over several tokens (None: ids only)


def decoding_vocabulary(backbone_config, tokenizer) -> Vocabulary:
    """EOS and pad from the backbone config, else the tokenizer; pad falls back to EOS, then 0."""
    eos_id = backbone_config.eos_token_id
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_token_id
    pad_id = backbone_config.pad_token_id
    if pad_id is None and tokenizer is not None:
        pad_id = tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    answer_close_id = single_token_id(tokenizer, ANSWER_CLOSE)
    return Vocabulary(backbone_config.mask_token_id, eos_id, pad_id, answer_close_id, tokenizer)
