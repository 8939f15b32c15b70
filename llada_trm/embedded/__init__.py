"""The embedded default: everything the default run and the tests need, shipped in the package.

`arithmetic_task` draws seeded multi-step arithmetic word problems, `tokenizer` trains the small domain tokenizer
(told the layout's answer tags by `pretrain`: this stage imports nothing of the package), and `assets` names
where the tiny pretrained LLaDA backbone (`assets/tiny-llada`, built by `python -m llada_trm.pretrain`) lives.
Hands on: data records and the `tiny-llada` backbone.
"""
