"""Exact per-token gradient norms and dot products with the aggregate gradient.

For token t with per-step losses l_{s,t} (s = refinement step; one step for llada_sft) and step weights
alpha_s, the token's loss is ell_t = sum_s alpha_s l_{s,t}. For the chosen parameters theta this module
computes, without approximation:

    step_norm2[s, t] = ||d l_{s,t} / d theta||^2        step_dot[s, t] = <d l_{s,t} / d theta, G>
    norm2[t]         = ||d ell_t / d theta||^2           dot[t]         = <d ell_t / d theta, G>

G being the micro-batch's aggregate gradient. Two paths, whose results add up over parameter groups:
- `LinearCapture` (position-wise linear layers, see selection.py): one ordinary backward gives, for every
  call s, the input a_{s,t} and the output gradient g_{s,t} at each token's own row; the per-token gradient is
  sum_s alpha_s g_{s,t} a_{s,t}^T, so norms are sums of products of dot products and no per-token gradient is
  ever formed.
- `batched_token_gradients` (everything else): per-token backward passes, vectorised over a chunk of tokens
  with `torch.autograd.grad(..., is_grads_batched=True)`, one step's loss at a time (with detached steps a
  step's backward only visits that step's graph). The chunk is sized so that the per-token gradients held at
  once (one step's and their running alpha-sum, float32) stay under `max_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

DEFAULT_MAX_BYTES = 64 * 2**20


@dataclass
class TokenGradients:
    step_norm2: Tensor  # (S, n)
    step_dot: Tensor  # (S, n)
    norm2: Tensor  # (n,)
    dot: Tensor  # (n,)

    @classmethod
    def zeros(cls, steps: int, n: int, device=None) -> "TokenGradients":
        z = torch.zeros(steps, n, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z[0].clone(), z[0].clone())

    def __add__(self, other: "TokenGradients") -> "TokenGradients":
        return TokenGradients(self.step_norm2 + other.step_norm2, self.step_dot + other.step_dot,
                              self.norm2 + other.norm2, self.dot + other.dot)


class LinearCapture:
    """Context manager: records every call's input rows and (after a backward) output-gradient rows of the
    given linear layers, in call order."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.inputs: dict[str, list[Tensor]] = {name: [] for name in modules}
        self.grads: dict[str, dict[int, Tensor]] = {name: {} for name in modules}
        self._handles = []
        self.listening = False  # output gradients are kept only during `backward`, not in later batched passes

    def __enter__(self) -> "LinearCapture":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module, inputs, output):
            if not output.requires_grad:  # a call under no_grad cannot carry gradient
                return
            call = len(self.inputs[name])
            self.inputs[name].append(inputs[0].detach().flatten(0, -2))

            def store(grad, call=call):
                if self.listening:
                    self.grads[name][call] = grad.detach().flatten(0, -2)

            output.register_hook(store)

        return record

    def backward(self, losses: list[Tensor]) -> None:
        """One backward of the summed losses to the captured layers: their output gradients at each token's row
        are then exactly d l_{s,t} / d output (position-wise layers)."""
        self.listening = True
        try:
            torch.autograd.grad(sum(loss.sum() for loss in losses), [m.weight for m in self.modules.values()],
                                retain_graph=True, allow_unused=True)
        finally:
            self.listening = False

    def token_gradients(self, rows: Tensor, aggregate: dict[str, Tensor], alpha: Tensor) -> TokenGradients:
        """Per-token quantities of the captured layers. rows: (n,) the row of each token in every call's flattened
        input; aggregate: G restricted to each layer's weight; alpha: (S,) step weights, one call per step."""
        steps, n = alpha.numel(), rows.numel()
        total = TokenGradients.zeros(steps, n, rows.device)
        for name, calls in self.inputs.items():
            if len(calls) != steps:
                raise RuntimeError(f"{name} was called {len(calls)} times for {steps} loss steps; it is not "
                                   "position-wise here, so choose it without the fast path")
            a = torch.stack([x[rows] for x in calls]).double()  # (S, n, in)
            g = torch.stack([self.grads[name].get(c, torch.zeros(x.shape[0], self.modules[name].out_features,
                                                                  device=x.device))[rows]
                             for c, x in enumerate(calls)]).double()  # (S, n, out)
            G = aggregate[name].double()
            step_dot = torch.einsum("sno,oi,sni->sn", g, G, a)
            gram = torch.einsum("sno,rno->nsr", g, g) * torch.einsum("sni,rni->nsr", a, a)
            a64 = alpha.double()
            total = total + TokenGradients(
                step_norm2=torch.diagonal(gram, dim1=1, dim2=2).T.contiguous(), step_dot=step_dot,
                norm2=torch.einsum("s,r,nsr->n", a64, a64, gram), dot=a64 @ step_dot)
        return total


def batched_token_gradients(step_losses: list[Tensor], params: list[Tensor], aggregate: Tensor, alpha: Tensor,
                            max_bytes: int = DEFAULT_MAX_BYTES) -> TokenGradients:
    """step_losses: S tensors (n,) attached to the graph; params: the general-path parameters; aggregate: G over
    those parameters, flattened in the same order."""
    steps, n = len(step_losses), step_losses[0].numel()
    result = TokenGradients.zeros(steps, n, aggregate.device)
    size = sum(p.numel() for p in params)
    if not params or n == 0:
        return result
    # Two (chunk, P) float32 buffers live at a time: one step's per-token gradients and their alpha-sum.
    chunk = max(1, min(n, max_bytes // max(1, 8 * size)))
    G = aggregate.float()
    for start in range(0, n, chunk):
        index = torch.arange(start, min(n, start + chunk), device=aggregate.device)
        combined = None
        for s, loss in enumerate(step_losses):
            grads = _batched_grads(loss, params, index, size)  # (k, P)
            result.step_norm2[s, index] = grads.pow(2).sum(-1).double()
            result.step_dot[s, index] = (grads @ G).double()
            combined = grads.mul_(alpha[s]) if combined is None else combined.add_(grads, alpha=float(alpha[s]))
        result.norm2[index] = combined.pow(2).sum(-1).double()
        result.dot[index] = (combined @ G).double()
    return result


def _batched_grads(loss: Tensor, params: list[Tensor], index: Tensor, size: int) -> Tensor:
    """(k, P) float32: the gradient of loss[i] for each i in index, flattened over params."""
    k = index.numel()
    if not loss.requires_grad:
        return torch.zeros(k, size, device=index.device)
    cotangent = torch.zeros(k, loss.numel(), dtype=loss.dtype, device=loss.device)
    cotangent[torch.arange(k, device=loss.device), index.to(loss.device)] = 1
    grads = torch.autograd.grad(loss, params, grad_outputs=cotangent, is_grads_batched=True, retain_graph=True,
                                allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros(k, *p.shape, device=p.device)).reshape(k, -1).float()
                      for g, p in zip(grads, params)], dim=1)
