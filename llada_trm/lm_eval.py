"""The lm-evaluation-harness command line with the `llada_trm` model registered and the shipped tasks found.

    pip install -e ".[eval]"
    python -m llada_trm.lm_eval --model llada_trm --model_args checkpoint=runs/llada-trm/model,decoder=hybrid/r1 \
        --tasks llada_trm_arithmetic --batch_size 8
    python -m llada_trm.lm_eval --model llada_trm --model_args backbone=GSAI-ML/LLaDA-8B-Instruct,prompt_style=raw \
        --tasks gsm8k --num_fewshot 0 --batch_size 8          # GPU; docs/evaluation.md has the 8B commands

Every flag is the harness's own (`lm_eval --help`); this program only imports the model first (the `lm_eval`
console command cannot discover a model outside its own package) and adds `--include_path` with the tasks shipped
in llada_trm/embedded/lm_eval_tasks when none is given. After the harness's table it prints the decoding cost per
task: new tokens, backbone row-passes and TPF. Under `accelerate launch` every process runs this same command.
A model arg the model cannot take is one `error:` line and exit code 2; without the `eval` extra, so is any run.
"""

from __future__ import annotations

import os
import sys

from llada_trm.cli import EXIT_USAGE
from llada_trm.inference.harness_task import TASKS_DIR


def with_shipped_tasks(argv: list[str]) -> list[str]:
    """`argv` with `--include_path <shipped tasks>` added to a run (or a listing) that names no include path."""
    if any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
        return argv
    if not any(arg.startswith("--") for arg in argv) or "-h" in argv or "--help" in argv:
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval.__main__ import cli_evaluate

        from llada_trm.inference import harness
    except ImportError as error:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: python -m llada_trm.lm_eval [lm_eval flags]\n\n{__doc__}\n"
                  f"lm-eval is not installed ({error}): pip install -e \".[eval]\"")
            return 0
        print(f"error: lm-eval is not installed ({error}); install the eval extra: pip install -e \".[eval]\"",
              file=sys.stderr)
        return EXIT_USAGE
    sys.argv = ["python -m llada_trm.lm_eval", *with_shipped_tasks(argv)]
    try:
        cli_evaluate()
    except harness.HarnessArgumentError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, no traceback
        return EXIT_USAGE
    cost = harness.latest_cost()
    if cost and int(os.environ.get("RANK", "0")) == 0:
        print("decoding cost per task (all processes):")
        print(harness.format_cost_table(cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
