"""Inference: LLaDA's own sampler, chunk-by-chunk refinement decoding, and fair exact-match scoring.

`sampler` is LLaDA's `generate` (backbone alone); `chunk_decoding` is `generate_with_refinement`, the hybrid's
decoder (and, with refinement off, the backbone run block-causally), configured by `DecodingSettings`
(`decoding_settings`);
`prompts` turns prompts into the left-padded rows both decoders take; `exact_match` scores decoders side by side
on the same problems with the same token budget, and counts what each costs (backbone row-passes, FLOPs);
`frontier` puts decoders at several speeds side by side (exact match against tokens per pass); `checkpoints`
loads a model for inference (`load_for_inference`); `own_decodes` turns the sampler's decodes of training
problems into training records (self-distillation). Hands on: generated tokens, texts and accuracy tables.
"""
