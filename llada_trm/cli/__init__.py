"""The command-line programs: each parses flags, calls the library and turns user mistakes into one line and exit 2.

`train` (train_llada_trm_hybrid_sft.py), `generate`, `evaluate`, `inspect_chunks`, `compare`, `ablate`,
`pretrain` and `synthetic`. Run them as `python -m llada_trm.<name>` (`inspect` for `inspect_chunks`); the
library they call lives in the stage packages.
"""

EXIT_USAGE = 2  # exit code of every command-line program for a user mistake (bad path or argument)
