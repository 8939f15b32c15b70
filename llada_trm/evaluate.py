"""`python -m llada_trm.evaluate`: runs the program in llada_trm/cli/evaluate.py."""

import sys

from llada_trm.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
