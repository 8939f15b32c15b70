"""Training: objectives, the deep-supervision loss with truncation and token weights, and the loop.

`objectives` turn a model output into a loss sum and its normaliser (the model's `losses`, `truncation`,
`weighting`); the trainer normalises globally over the accumulation window and ranks, evaluates with the
inference stage (`held_out`) and checkpoints through accelerate (`checkpointing`, `run_directory`);
`grad_trace` records per-token gradients during a run. `arguments` holds the flags of the training program. Hands on:
checkpoints, `metrics.jsonl` and `eval_results.json` in the run directory.
"""
