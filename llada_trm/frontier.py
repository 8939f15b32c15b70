"""`python -m llada_trm.frontier`: runs the program in llada_trm/cli/frontier.py."""

import sys

from llada_trm.cli.frontier import main

if __name__ == "__main__":
    sys.exit(main())
