"""Token-level loss truncation: drop the supervised tokens at and after a loss spike from the loss.

What is notable:
- Configuration comes from TRUNCATION_* environment variables, optionally a named preset of the strategy
  ladder, and `--truncation_<field>` flags. Precedence: flag > preset > environment > default. Parsing is
  strict: a bad value or an unknown TRUNCATION_* variable stops the program with a message naming it.
- The decision is vectorised over the batch. Index i runs over the *valid* (supervised) positions of a row,
  which need not be contiguous: each valid position's rank comes from a cumsum of the valid mask.
- The returned `keep` mask is the loss mask itself: True exactly at valid positions that stay in the loss.
- The ratio-mode quantile is torch.quantile's default linear interpolation, computed by sort + gather so
  that the per-sequence scope needs no loop over rows (and so that there is no input-size limit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from llada_trm.env_flags import parse_bool
from llada_trm.training.weighting import CEIL_SLACK

ENV_PREFIX = "TRUNCATION_"
THRESHOLD_MODES = ("absolute", "ratio")
RATIO_SCOPES = ("batch", "sequence")
MASK_MODES = ("after_first_high", "mask_high_only", "mask_random")


class TruncationConfigError(ValueError):
    """A TRUNCATION_* variable, --truncation_* flag or preset name that cannot be used."""


@dataclass
class TruncationConfig:
    enable: bool = False
    threshold_mode: str = "absolute"  # absolute: high if loss > threshold; ratio: top `ratio` of losses
    threshold: float = 2.0
    ratio: float = 0.1
    ratio_scope: str = "batch"  # batch: quantile over the micro-batch; sequence: per row
    mask_mode: str = "after_first_high"
    include_trigger: bool = True
    min_prefix_tokens: int = 0
    max_mask_ratio: float = 1.0
    min_high_run: int = 1
    random_ratio: float = 0.1
    log_every_n_steps: int = 50
    log_detailed: bool = False
    log_detailed_every_n_steps: int = 100
    debug: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            problem = _check_value(f.name, getattr(self, f.name))
            if problem:
                raise TruncationConfigError(f"{env_name(f.name)} {problem}")
            if _FIELD_TYPES[f.name] == "float":
                setattr(self, f.name, float(getattr(self, f.name)))  # threshold=4 is stored as 4.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, overrides: Mapping | None = None) -> TruncationConfig:
        """Config from TRUNCATION_* variables; a non-None override (a --truncation_<field> flag) wins."""
        values = _parse_environ(environ)
        values.update(_parse_overrides(overrides))
        return cls(**values)

    @classmethod
    def from_preset(
        cls, name: str, environ: Mapping[str, str] = os.environ, overrides: Mapping | None = None
    ) -> TruncationConfig:
        """Config of a ladder preset. Precedence: flag > preset > environment > default.

        Presets set every strategy variable, so the environment only contributes the logging variables;
        an environment value that the preset replaces by a different one gives a warning.
        """
        key = _preset_key(name)
        values = _parse_environ(environ)
        preset = {}
        for var, raw in TRUNCATION_PRESETS[key].items():
            field = var[len(ENV_PREFIX):].lower()
            preset[field] = _parse_value(field, raw, f"{var} of preset {key}")
        for field, value in preset.items():
            if field in values and values[field] != value:
                warnings.warn(
                    f"{env_name(field)}={values[field]!r} from the environment is replaced by "
                    f"preset {key} ({value!r})",
                    stacklevel=2,
                )
        values.update(preset)
        values.update(_parse_overrides(overrides))
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The effective settings, a few lines to print at start."""
        if not self.enable:
            head = "Token-level truncation: disabled"
        else:
            if self.mask_mode == "mask_random":
                rule = f"mask_random p={self.random_ratio}"
            else:
                if self.threshold_mode == "absolute":
                    high = f"loss > {self.threshold}"
                else:
                    high = f"top {self.ratio} of losses per {self.ratio_scope}"
                rule = f"{self.mask_mode}, high = {high}"
            head = f"Token-level truncation: enabled ({rule})"
        width = max(len(env_name(f.name)) for f in dataclasses.fields(self))
        lines = [head] + [f"  {env_name(k):<{width}} = {_format(v)}" for k, v in self.to_dict().items()]
        return "\n".join(lines)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return f"--truncation_{field}"


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TruncationConfig)}  # annotations are strings
_CHOICES = {"threshold_mode": THRESHOLD_MODES, "ratio_scope": RATIO_SCOPES, "mask_mode": MASK_MODES}
_UNIT_INTERVAL = ("ratio", "random_ratio", "max_mask_ratio")  # each must lie in (0, 1]
_MINIMUM = {"min_prefix_tokens": 0, "min_high_run": 1, "log_every_n_steps": 1, "log_detailed_every_n_steps": 1}


def _format(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_value(field: str, value) -> str | None:
    """None if `value` is a valid typed value of `field`, else what is wrong (the caller names the source)."""
    kind = _FIELD_TYPES[field]
    if kind == "bool" and not isinstance(value, bool):
        return f"must be a boolean (true/false/1/0/yes/no), got {value!r}"
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer, got {value!r}"
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"must be a number, got {value!r}"
    if kind == "str" and value not in _CHOICES[field]:
        return f"must be one of {', '.join(_CHOICES[field])}, got {value!r}"
    if kind == "float" and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if field in _UNIT_INTERVAL and not 0 < value <= 1:
        return f"must be in (0, 1], got {value!r}"
    if field in _MINIMUM and value < _MINIMUM[field]:
        return f"must be an integer >= {_MINIMUM[field]}, got {value!r}"
    return None


def _parse_value(field: str, raw, source: str):
    """Parse a raw value (a string, or an already typed flag value) and check it; errors name `source`."""
    kind = _FIELD_TYPES[field]
    value = raw
    if isinstance(raw, str):
        text = raw.strip()
        value = text  # an unparseable text falls through to _check_value, which rejects it with the rule
        if kind == "bool":
            parsed = parse_bool(text)
            value = text if parsed is None else parsed
        elif kind in ("int", "float"):
            with contextlib.suppress(ValueError):
                value = int(text) if kind == "int" else float(text)
        elif kind == "str":
            value = text.lower()
    elif kind == "float" and isinstance(raw, int) and not isinstance(raw, bool):
        value = float(raw)
    problem = _check_value(field, value)
    if problem:
        raise TruncationConfigError(f"{source} {problem}")
    return value


def _parse_environ(environ: Mapping[str, str]) -> dict:
    known = {env_name(f): f for f in _FIELD_TYPES}
    values = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        if var not in known:
            raise TruncationConfigError(
                f"unknown environment variable {var} (a typo?); known variables: {', '.join(known)}"
            )
        values[known[var]] = _parse_value(known[var], environ[var], var)
    return values


def _parse_overrides(overrides: Mapping | None) -> dict:
    """Flag values keyed by field name (or by `truncation_<field>`); None means the flag was not given."""
    values = {}
    for key, raw in (overrides or {}).items():
        field = key[len("truncation_"):] if key.startswith("truncation_") else key
        if field not in _FIELD_TYPES:
            raise TruncationConfigError(
                f"unknown flag {flag_name(field)}; known flags: {', '.join(map(flag_name, _FIELD_TYPES))}"
            )
        if raw is not None:
            values[field] = _parse_value(field, raw, flag_name(field))
    return values


# --- presets: the strategy ladder (docs/architecture.md §10) ----------------------------------------------------------

# The strategy variables are every field but the logging ones; a preset starts from their dataclass defaults (the
# one place they are stated), with truncation on.
_STRATEGY_DEFAULTS = {
    env_name(f.name): _format(f.default) for f in dataclasses.fields(TruncationConfig)
    if not f.name.startswith("log_") and f.name != "debug"
} | {"TRUNCATION_ENABLE": "true"}
_A2_PROTECTIONS = {
    "TRUNCATION_MIN_PREFIX_TOKENS": "32",
    "TRUNCATION_MAX_MASK_RATIO": "0.5",
    "TRUNCATION_MIN_HIGH_RUN": "2",
}
# Each preset names every strategy variable (the defaults above, then its own changes), so a stray export
# in the shell cannot change a ladder rung; logging variables still come from the environment.
TRUNCATION_PRESETS: dict[str, dict[str, str]] = {
    name: {**_STRATEGY_DEFAULTS, **changes}
    for name, changes in {
        "baseline": {"TRUNCATION_ENABLE": "false"},
        "A1": {},
        "A1b": {"TRUNCATION_INCLUDE_TRIGGER": "false"},
        "A2": _A2_PROTECTIONS,
        "A3": {"TRUNCATION_THRESHOLD_MODE": "ratio", "TRUNCATION_RATIO": "0.1", **_A2_PROTECTIONS},
        "A4": {"TRUNCATION_MASK_MODE": "mask_high_only", "TRUNCATION_MIN_PREFIX_TOKENS": "32"},
        "A5": {"TRUNCATION_MASK_MODE": "mask_random", "TRUNCATION_RANDOM_RATIO": "0.1",
               "TRUNCATION_MIN_PREFIX_TOKENS": "32"},
    }.items()
}


def _preset_key(name: str) -> str:
    for key in TRUNCATION_PRESETS:
        if key.lower() == str(name).strip().lower():
            return key
    raise TruncationConfigError(
        f"unknown truncation preset {name!r}; known presets: {', '.join(TRUNCATION_PRESETS)}"
    )


# --- the decision -----------------------------------------------------------------------------------------


@dataclass
class TruncationDecision:
    keep: Tensor  # (B, L) bool: True exactly at valid positions that stay in the loss (this is the loss mask)
    trigger: Tensor  # (B,) long: valid-rank of the trigger, -1 if none
    start: Tensor  # (B,) long: valid-rank of the first masked token, valid_len if nothing is masked
    threshold: Tensor  # (B,) float: the high-loss threshold in force for the row, NaN where there is none
    masked_count: Tensor  # (B,) long: valid tokens removed from the loss


def linear_quantile(values: Tensor, counts: Tensor, q: float) -> Tensor:
    """Per-row quantile of the first counts[r] entries of each row after sorting (others must be +inf).

    values (R, N), counts (R,) -> (R,). Same arithmetic as torch.quantile's default 'linear' interpolation
    (rank q * (n - 1) in the values' dtype, lerp between the neighbours); NaN for a row with count 0.
    """
    sorted_values = values.sort(dim=1).values
    last = (counts - 1).clamp(min=0).to(values.dtype)
    ranks = torch.tensor(q, dtype=values.dtype, device=values.device) * last  # (R,)
    below = ranks.floor().long().unsqueeze(1)
    above = ranks.ceil().long().unsqueeze(1)
    weight = (ranks - below.squeeze(1).to(values.dtype)).unsqueeze(1)
    result = torch.lerp(sorted_values.gather(1, below), sorted_values.gather(1, above), weight).squeeze(1)
    return torch.where(counts > 0, result, torch.full_like(result, float("nan")))


def _high_mask(loss: Tensor, valid: Tensor, config: TruncationConfig) -> tuple[Tensor, Tensor]:
    """(high (B, L) bool at valid positions, threshold (B,) float)."""
    batch = loss.shape[0]
    if config.threshold_mode == "absolute":
        threshold = torch.full((batch,), float(config.threshold), dtype=loss.dtype, device=loss.device)
        # Compared in float64 so that "loss > threshold" is exact for the parsed threshold (e.g. 0.1).
        return valid & (loss.double() > config.threshold), threshold
    padded = loss.masked_fill(~valid, float("inf"))  # padding sorts last, out of each row's first count slots
    if config.ratio_scope == "batch":
        q = linear_quantile(padded.reshape(1, -1), valid.sum().reshape(1), 1 - config.ratio)
        threshold = q.expand(batch).clone()
    else:
        threshold = linear_quantile(padded, valid.sum(dim=1), 1 - config.ratio)
    # A NaN threshold (no valid token) compares False, so nothing is high there.
    return valid & (loss >= threshold.unsqueeze(1)), threshold


def _first_rank(condition: Tensor, rank: Tensor, none: Tensor) -> Tensor:
    """Smallest rank where `condition` holds per row, else `none` (B,)."""
    sentinel = condition.shape[1]  # ranks are < L
    first = torch.where(condition, rank, sentinel).amin(dim=1)
    return torch.where(first == sentinel, none, first)


def truncation_decisions(
    per_token_loss: Tensor, valid_mask: Tensor, config: TruncationConfig, generator: torch.Generator | None = None
) -> TruncationDecision:
    """Which valid tokens stay in the loss. per_token_loss, valid_mask (B, L); the loss is detached here."""
    if per_token_loss.dim() != 2 or per_token_loss.shape != valid_mask.shape:
        raise ValueError(
            f"per_token_loss and valid_mask must both be (B, L), got {tuple(per_token_loss.shape)} "
            f"and {tuple(valid_mask.shape)}"
        )
    loss = per_token_loss.detach().float()
    valid = valid_mask.bool()
    batch, device = loss.shape[0], loss.device
    valid_len = valid.sum(dim=1)  # (B,)
    rank = valid.long().cumsum(dim=1) - 1  # (B, L): i for the i-th valid position of its row
    no_trigger = torch.full((batch,), -1, dtype=torch.long, device=device)
    no_threshold = torch.full((batch,), float("nan"), device=device)

    if not config.enable:
        zero = torch.zeros(batch, dtype=torch.long, device=device)
        return TruncationDecision(valid.clone(), no_trigger, valid_len, no_threshold, zero)

    eligible = valid & (rank >= config.min_prefix_tokens)
    if config.mask_mode == "mask_random":
        # Drawn on the generator's device, so one seeded CPU generator gives the same mask on any device.
        draw_device = generator.device if generator is not None else device
        draws = torch.rand(loss.shape, generator=generator, device=draw_device).to(device)
        masked = eligible & (draws < config.random_ratio)
        trigger, threshold = no_trigger, no_threshold
    else:
        high, threshold = _high_mask(loss, valid, config)
        if config.mask_mode == "mask_high_only":
            masked = eligible & high
            trigger = _first_rank(high, rank, no_trigger)
        else:
            # Length of the run of high tokens (in valid order) ending at each valid high position: its rank
            # minus the rank of the last valid low token before it (-1 if none). Padding is skipped.
            low_rank = torch.where(valid & ~high, rank, -1)
            run = rank - low_rank.cummax(dim=1).values
            run_end = _first_rank(high & (run >= config.min_high_run), rank, no_trigger)
            trigger = torch.where(run_end >= 0, run_end - (config.min_high_run - 1), no_trigger)
            start = trigger + (0 if config.include_trigger else 1)
            max_mask_start = torch.ceil(valid_len.double() * (1 - config.max_mask_ratio) - CEIL_SLACK).long()
            start = torch.maximum(start, max_mask_start).clamp(min=config.min_prefix_tokens)
            start = torch.where(trigger >= 0, start, valid_len)
            masked = valid & (rank >= start.unsqueeze(1))

    keep = valid & ~masked
    start = _first_rank(masked, rank, valid_len)
    return TruncationDecision(keep, trigger, start, threshold, masked.sum(dim=1))


def truncation_keep_mask(
    per_token_loss: Tensor, valid_mask: Tensor, config: TruncationConfig, generator: torch.Generator | None = None
) -> Tensor:
    """(B, L) bool loss mask: True exactly at the valid positions that stay in the loss."""
    return truncation_decisions(per_token_loss, valid_mask, config, generator).keep
