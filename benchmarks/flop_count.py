"""Counted FLOPs of the project's own code at any LLaDA shape, on a CPU, split into the parts of a model.

    with shape_only_compute():                         # optional: skip the arithmetic, keep every shape
        split = count_flops(lambda: model(**batch).loss.backward(), parts_of(model))

Counting is torch's `FlopCounterMode` (matrix products and attention, forward and backward, whatever runs inside
the context: a backward or a recomputation in it is counted). Three additions make it work at the 8B shape on a
small CPU:

- CPU attention. This torch build runs SDPA on CPU as `_scaled_dot_product_flash_attention_for_cpu`, which
  FlopCounterMode has no formula for (it counts 0); `CPU_ATTENTION` maps it (and its backward) to torch's own SDPA
  formulas. Attention is counted dense, the full L x L score matrix, as CPU SDPA computes it under a boolean mask
  (FlexAttention on CUDA skips fully masked tiles; not counted here).
- Shapes without arithmetic. `shape_only_compute` answers every counted product with a zero tensor of the
  output's shape and strides (from the op's meta kernel) instead of computing it, and `lazy_parameters` gives a
  model uninitialised weights whose pages the OS never maps (no product reads them). Everything else (masks,
  indexing, norms, softmax, the training code's control flow) still runs for real, so the count is the one of a
  real run: tests/test_flop_count.py checks both against a plain FlopCounterMode run.
- Layers and vocabulary by difference. `extrapolate` counts with 1 and 2 backbone layers and with two small
  vocabularies and extends linearly to the shape: exact, because LLaDA's layers are identical and the vocabulary
  only sets the width of the LM head's products (also tested).

`PartCounter` splits every counted op into backbone, head body, output layer (the backbone's LM head, wherever it
is applied) and attention (SDPA of backbone and head): a product belongs to the part of the weight it multiplies,
or, for a weight's own gradient (which does not read the weight), to the weight the running autograd node leads to.
The parts always sum to FlopCounterMode's total (checked on every count).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
PARTS = ("backbone", "head", "output_layer", "attention")


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}
ATTENTION_OPS = {*CPU_ATTENTION, aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
                 aten._scaled_dot_product_flash_attention_backward,
                 aten._scaled_dot_product_efficient_attention_backward}
PRODUCT_OPS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}


@dataclass
class FlopSplit:
    """FLOPs by part (FlopCounterMode's convention: a multiply-add is 2 FLOPs), and the MiB saved for backward."""

    backbone: float = 0.0
    head: float = 0.0
    output_layer: float = 0.0
    attention: float = 0.0
    saved_mib: float = 0.0

    @property
    def total(self) -> float:
        return self.backbone + self.head + self.output_layer + self.attention

    def _combine(self, other: "FlopSplit", sign: float) -> "FlopSplit":
        return FlopSplit(*(getattr(self, f.name) + sign * getattr(other, f.name) for f in fields(self)))

    def __add__(self, other: "FlopSplit") -> "FlopSplit":
        return self._combine(other, 1.0)

    def __sub__(self, other: "FlopSplit") -> "FlopSplit":
        return self._combine(other, -1.0)

    def __mul__(self, factor: float) -> "FlopSplit":
        return FlopSplit(*(getattr(self, f.name) * factor for f in fields(self)))

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> "FlopSplit":
        return self * (1.0 / divisor)


# ------------------------------------------------------------------------------------------------ splitting

def parts_of(model: torch.nn.Module) -> dict[int, str]:
    """{storage address: part} for every weight of a hybrid (`.backbone`, `.head`) or of a backbone alone (a
    LLaDAModelLM, peft-wrapped or not: LoRA adapters count as backbone)."""
    backbone = getattr(model, "backbone", model)
    owners = {}
    for parameter in backbone.parameters():
        owners[parameter.untyped_storage().data_ptr()] = "backbone"
    for parameter in getattr(model, "head", torch.nn.Module()).parameters():
        owners[parameter.untyped_storage().data_ptr()] = "head"
    output_weight = backbone.get_output_embeddings().weight
    owners[output_weight.untyped_storage().data_ptr()] = "output_layer"
    return owners


def _leaf_variables(node, depth: int = 3):
    """The leaf tensors (parameters) an autograd node feeds gradients to, at most `depth` nodes away."""
    if node is None or depth == 0:
        return
    variable = getattr(node, "variable", None)
    if variable is not None:
        yield variable
        return
    for next_node, _ in node.next_functions:
        yield from _leaf_variables(next_node, depth - 1)


class PartCounter(FlopCounterMode):
    """FlopCounterMode that also files every counted op under one of PARTS (module docstring)."""

    def __init__(self, owners: dict[int, str]):
        super().__init__(display=False, custom_mapping=CPU_ATTENTION)
        self.owners = owners
        self.by_part: dict[str, int] = defaultdict(int)
        self.unattributed = 0

    def part_of(self, func_packet, args) -> str | None:
        if func_packet in ATTENTION_OPS:
            return "attention"
        for arg in args:
            if isinstance(arg, torch.Tensor):
                part = self.owners.get(arg.untyped_storage().data_ptr())
                if part is not None:
                    return part
        for variable in _leaf_variables(torch._C._current_autograd_node()):  # a weight's own gradient
            part = self.owners.get(variable.untyped_storage().data_ptr())
            if part is not None:
                return part
        return None

    def _count_flops(self, func_packet, out, args, kwargs):
        before = self.flop_counts["Global"].get(func_packet, 0)
        result = super()._count_flops(func_packet, out, args, kwargs)
        added = self.flop_counts["Global"].get(func_packet, 0) - before
        if added:
            part = self.part_of(func_packet, args)
            if part is None:
                self.unattributed += added
            else:
                self.by_part[part] += added
        return result


def count_flops(fn: Callable[[], object], owners: dict[int, str], meter=None) -> FlopSplit:
    """Run `fn` once under a PartCounter -> its FLOPs by part. `meter`: an entered SavedTensorMeter-like object
    whose `.mib` becomes `saved_mib` (None: 0)."""
    with PartCounter(owners) as counter:
        fn()
    split = FlopSplit(**{part: float(counter.by_part.get(part, 0)) for part in PARTS},
                      saved_mib=meter.mib if meter is not None else 0.0)
    if counter.unattributed or abs(split.total - counter.get_total_flops()) > 0:
        raise RuntimeError(f"{counter.unattributed} FLOPs of {counter.get_total_flops()} belong to no part: "
                           f"a product of a weight outside the model passed to parts_of?")
    return split


# ----------------------------------------------------------------------------------------- shapes only

def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


# Outputs this large are left uninitialised (torch.empty): such allocations come from fresh pages, which the OS
# maps only when written (a weight gradient of full fine-tuning is never read in a count). Smaller ones are zeros.
LAZY_BYTES = 64 * 2**20


def _like(meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=device)
    return out if meta.numel() * meta.element_size() >= LAZY_BYTES else out.zero_()


class _ShapeOnly(TorchDispatchMode):
    """Answers matrix products and attention with zeros of the right shape (their meta kernels give it)."""

    SKIPPED = {*PRODUCT_OPS, *ATTENTION_OPS, aten.embedding_dense_backward}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket not in self.SKIPPED or func._schema.is_mutable:
            return func(*args, **kwargs)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        out = func(*_to_meta(args), **_to_meta(kwargs))
        if isinstance(out, torch.Tensor):
            return _like(out, device)
        return type(out)(_like(o, device) if isinstance(o, torch.Tensor) else o for o in out)


@contextlib.contextmanager
def shape_only_compute():
    """Inside: counted products are not computed (their outputs are zeros). Enter it before the counter."""
    with _ShapeOnly():
        yield


def lazy_parameters(module: torch.nn.Module, device: str = "cpu") -> torch.nn.Module:
    """A module built on the meta device, given real but uninitialised storage (`to_empty`): big weights cost
    address space, not memory. Norm weights are set to 1 and everything else small to 0, so no value is garbage."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if tensor.numel() * tensor.element_size() < LAZY_BYTES:
                tensor.fill_(1.0 if "norm" in name else 0.0)
    return module


# ------------------------------------------------------------------------------------- layers and vocabulary

SMALL_VOCABULARIES = (512, 1024)


def extrapolate(count: Callable[[int, int], dict[str, FlopSplit]], n_layers: int, vocab_size: int,
                small_vocabularies: tuple[int, int] = SMALL_VOCABULARIES) -> dict[str, FlopSplit]:
    """{row: split} at `n_layers` and `vocab_size` from counts `count(layers, vocabulary)` at (1, v1), (2, v1) and
    (1, v2): c = c(1, v1) + (n - 1) (c(2, v1) - c(1, v1)) + (V - v1) / (v2 - v1) (c(1, v2) - c(1, v1)).

    Exact: the layers are identical and nothing else depends on their number; the vocabulary only sets the width
    of the LM head's products (and of what they save), which run once per use whatever the depth. Counting at a
    small vocabulary also skips the real softmax work over 126,464 logits per token, most of a count's time."""
    v1, v2 = small_vocabularies
    base = count(1, v1)
    deeper = count(2, v1) if n_layers != 1 else base
    wider = count(1, v2) if vocab_size != v1 else base
    vocab_factor = (vocab_size - v1) / (v2 - v1)
    return {row: base[row] + (deeper[row] - base[row]) * (n_layers - 1) + (wider[row] - base[row]) * vocab_factor
            for row in base}
