"""`python -m llada_trm.generate`: runs the program in llada_trm/cli/generate.py."""

import sys

from llada_trm.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
