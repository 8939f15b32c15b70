"""Which parameters the trace differentiates, and which of them take the outer-product fast path.

`--token_grad_trace_params` is a comma-separated list of patterns on the names of the model's trainable
parameters (`model.named_parameters()` of the unwrapped model): shell wildcards (`head.blocks.1.*`), or a
plain name, which matches that parameter or every parameter under that module (`head.out_proj`).

Fast path: a linear layer whose output at position t reaches the loss of token t only (and no other token's
loss), and in the hybrid only the loss of the step that called it. For such a layer the gradient of token t's
loss is exactly a sum over its calls of outer products g a^T of the output gradient and the input at t, so
norms and dot products follow from the two factors. The layers known to be position-wise:
- hybrid: `head.out_proj` (logits_s = lm_head(h + out_proj(y_s)), position by position);
- llada_sft: in the backbone's last block, `q_proj`, `attn_out` and the MLP (`ff_proj`, `up_proj`, `ff_out`),
  with their LoRA adapters: after the last attention everything is position-wise, and a query only shapes its
  own position's output. `k_proj`, `v_proj` and the norms feeding them mix positions.
Every other chosen parameter takes the general path (exact per-token backward passes, batched).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

LLADA_POSITIONWISE = ("q_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


class TraceSelectionError(ValueError):
    """A --token_grad_trace_params value that selects nothing usable."""


def _last_block_index(model) -> int:
    config = getattr(model, "config", None)
    layers = getattr(config, "n_layers", None)
    if layers is None:  # a PEFT wrapper: the LLaDA config sits on the wrapped model
        layers = model.get_base_model().config.n_layers
    return layers - 1


def default_patterns(model, objective: str) -> list[str]:
    if objective == "hybrid":
        return [f"head.blocks.{len(model.head.blocks) - 1}", "head.out_proj"]
    return [f"*transformer.blocks.{_last_block_index(model)}.*"]


def parse_patterns(text: str | None, model, objective: str) -> list[str]:
    if text is None or not text.strip() or text.strip() == "default":
        return default_patterns(model, objective)
    return [part.strip() for part in text.split(",") if part.strip()]


def matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def select_parameters(model, patterns: list[str]) -> dict[str, nn.Parameter]:
    """Trainable parameters matching any pattern; a pattern that matches none is an error naming it."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    chosen = {}
    for pattern in patterns:
        hits = {n: p for n, p in trainable.items() if matches(n, pattern)}
        if not hits:
            raise TraceSelectionError(
                f"--token_grad_trace_params: {pattern!r} matches no trainable parameter "
                f"(trainable ones start with: {', '.join(sorted({n.rsplit('.', 2)[0] for n in trainable})[:6])})")
        chosen.update(hits)
    return chosen


def positionwise_patterns(model, objective: str) -> list[str]:
    if objective == "hybrid":
        return ["head.out_proj"]
    last = _last_block_index(model)
    return [p for sub in LLADA_POSITIONWISE for p in (f"*transformer.blocks.{last}.{sub}",
                                                       f"*transformer.blocks.{last}.{sub}.*")]


def fast_linears(model, objective: str, chosen: dict[str, nn.Parameter]) -> dict[str, nn.Linear]:
    """The position-wise nn.Linear modules whose weight is chosen (their bias, if any, stays general)."""
    patterns = positionwise_patterns(model, objective)
    chosen_ids = {id(p) for p in chosen.values()}
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module.weight) in chosen_ids
            and any(fnmatchcase(name, p) for p in patterns)}
