"""Train the LLaDA + recursive-refinement hybrid (see README.md; `--help` lists every flag)."""

import sys

from llada_trm.train import main

if __name__ == "__main__":
    sys.exit(main())
