"""`python -m llada_trm.synthetic`: runs the program in llada_trm/cli/synthetic.py."""

import sys

from llada_trm.cli.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
