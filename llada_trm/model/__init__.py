"""The model: a native LLaDA backbone, the recursive refinement head and the hybrid that joins them.

`LLaDAModelLM` reads official LLaDA checkpoints (config fields and weight names as published); `attention`
builds the block-causal masks every pass uses; `head` is the z/y recursion and `hybrid` runs the backbone and
every refinement step over all chunks in one pass, returning per-step token losses and confidences;
`losses` is the deep-supervision loss over them (the model's own output loss, and what the training objectives
build on). `loading` and `integrity` read and check model files. Hands on: models and
their outputs (`HybridOutput`).
"""
