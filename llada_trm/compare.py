"""`python -m llada_trm.compare`: runs the program in llada_trm/cli/compare.py."""

import sys

from llada_trm.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
