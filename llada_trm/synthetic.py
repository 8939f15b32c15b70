"""Write a split of the synthetic arithmetic task (llada_trm/embedded/arithmetic_task.py) as JSON lines.

    python -m llada_trm.synthetic --split train --num 200 --out sample.jsonl
"""

from __future__ import annotations

import argparse
import json

from llada_trm.embedded.arithmetic_task import SPLITS, generate_split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=sorted(SPLITS), default="train")
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON-lines file to write")
    args = parser.parse_args(argv)
    with open(args.out, "w") as f:
        for record in generate_split(args.split, args.num, args.seed):
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
