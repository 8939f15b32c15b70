"""`python -m llada_trm.inspect`: runs the program in llada_trm/cli/inspect_chunks.py."""

import sys

from llada_trm.cli.inspect_chunks import main

if __name__ == "__main__":
    sys.exit(main())
