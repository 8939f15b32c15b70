"""The deep supervision's LM-head scoring alone: plain fp32 log-softmax against the fused, chunked loss.

    python benchmarks/bench_lm_head_loss.py [--tokens 512] [--width 512] [--vocab 32768] [--steps 8]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 3] [--threads 1]

One "step" scores `--tokens` supervised positions through a frozen LM head of `--vocab` x `--width`, as every
refinement step does: CE, p(label), max probability, argmax. `--steps` steps are summed into one weighted loss
and back-propagated to the inputs, the way the hybrid's loss is; "recomputed" runs each plain step under
torch.utils.checkpoint, as the hybrid did before the fused loss (its default with detached steps). Shown: time of
forward + backward, the memory autograd saved for backward (the weight excluded; a recomputed step rebuilds its
(N, V) log-probabilities during backward, which this does not count), and on CUDA the peak above what was resident.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import SavedTensorMeter, describe_machine, time_call  # noqa: E402

from llada_trm.model.hybrid_outputs import StepScores  # noqa: E402
from llada_trm.model.lm_head_loss import lm_head_scores  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="LM head dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def plain_step(inputs, weight, targets):
    return StepScores.of_logits(F.linear(inputs, weight), targets).ce


def fused_step(inputs, weight, targets):
    return lm_head_scores(inputs, weight, targets).ce


def recomputed_step(inputs, weight, targets):
    return checkpoint(plain_step, inputs, weight, targets, use_reentrant=False)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.width, generator=g) / args.width**0.5).to(args.device, dtype)
    base = torch.randn(args.steps, args.tokens, args.width, generator=g).to(args.device, dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(args.device)
    coefficient = torch.rand(args.tokens, generator=g).to(args.device)  # chunk weights, truncation, token weights

    def loss_of(step_fn):
        inputs = base.clone().requires_grad_(True)
        total = sum((s + 1) * (step_fn(inputs[s], weight, targets) * coefficient).sum() for s in range(args.steps))
        return inputs, total

    def run(step_fn):
        inputs, total = loss_of(step_fn)
        total.backward()
        return inputs.grad

    variants = {"plain log-softmax": plain_step, "plain, recomputed in backward": recomputed_step,
                "fused, chunked": fused_step}
    reference = run(plain_step).float()
    print(describe_machine(args))
    print(f"{args.steps} steps x {args.tokens} tokens, LM head {args.vocab} x {args.width} in {args.dtype}; "
          f"median of {args.repeats} after 1 warm-up\n")
    print(f"{'variant':<34}{'ms':>10}{'saved MiB':>11}{'peak MiB':>10}{'max |grad diff|':>17}")
    for name, step_fn in variants.items():
        run(step_fn)  # warm-up
        times = [time_call(lambda: run(step_fn), args.device) for _ in range(args.repeats)]
        meter = SavedTensorMeter()
        meter.skip.add(weight.untyped_storage().data_ptr())  # the LM head weight exists anyway
        with meter:
            loss_of(step_fn)
        peak = max(t[2] for t in times) if args.device == "cuda" else None
        difference = float((run(step_fn).float() - reference).abs().max())
        peak_text = f"{peak:.0f}" if peak is not None else "-"
        print(f"{name:<34}{statistics.median(t[0] for t in times):>10.1f}{meter.mib:>11.1f}{peak_text:>10}"
              f"{difference:>17.2e}")


if __name__ == "__main__":
    main()
