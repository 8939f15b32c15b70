"""Per-token gradient trace: record it during training, analyse it, compare runs, render it.

    python train_llada_trm_hybrid_sft.py --token_grad_trace_every 50 ...
    python -m llada_trm.grad_trace analyze RUN_DIR
    python -m llada_trm.grad_trace compare RUN_A RUN_B
    python -m llada_trm.grad_trace render RUN_DIR

See docs/grad_trace.md for what is computed and how.
"""

from llada_trm.training.grad_trace.tracer import TRACE_FILE, TokenGradTracer, build_grad_tracer

__all__ = ["TRACE_FILE", "TokenGradTracer", "build_grad_tracer"]
