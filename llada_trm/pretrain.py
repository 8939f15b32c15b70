"""`python -m llada_trm.pretrain`: runs the program in llada_trm/cli/pretrain.py."""

import sys

from llada_trm.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
