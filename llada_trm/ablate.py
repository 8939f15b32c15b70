"""`python -m llada_trm.ablate`: runs the program in llada_trm/cli/ablate.py."""

import sys

from llada_trm.cli.ablate import main

if __name__ == "__main__":
    sys.exit(main())
