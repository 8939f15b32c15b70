"""The functions the shipped lm-evaluation-harness tasks call (llada_trm/embedded/lm_eval_tasks/*.yaml).

Plain Python, no lm-eval import: the task YAMLs name them with `!function llada_trm.inference.harness_task.NAME`.
- `load_problems`: the embedded test problems from the JSON-lines file shipped next to the YAMLs (offline);
- `exact_match`: the project's exact match (`exact_match.is_correct`: the first `<answer>...</answer>` of the
  generation equals the reference answer, both stripped), so the harness scores what `python -m llada_trm.evaluate`
  scores;
- `choice_context` / `answer_choices`: the multiple-choice form of the same problems (the reference reasoning given,
  four tagged answers to rank by likelihood), which runs the `loglikelihood` path offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from llada_trm.data.layout import ANSWER_CLOSE, ANSWER_OPEN, render_prompt
from llada_trm.embedded.assets import ASSETS_DIR
from llada_trm.inference.exact_match import is_correct

TASKS_DIR = ASSETS_DIR.parent / "lm_eval_tasks"  # the YAMLs and the problems file, shipped in the package
PROBLEMS_FILE = TASKS_DIR / "arithmetic_test.jsonl"  # generate_split("test", 200, seed=0), as `evaluate` reads it


def load_problems(**_metadata) -> datasets.DatasetDict:
    """{"test": the shipped problems}; the harness passes its metadata (model args among them) as keywords."""
    records = [json.loads(line) for line in Path(PROBLEMS_FILE).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def exact_match(doc: dict, results: list[str]) -> dict:
    """{"exact_match": 1.0 or 0.0} of the (first) generation against the problem's answer."""
    return {"exact_match": float(is_correct(results[0], str(doc["answer"])))}


def choice_context(doc: dict) -> str:
    """The prompt and the reference reasoning, up to where the tagged answer starts."""
    return render_prompt(doc["question"]) + "\n".join(doc["reasoning"]) + "\n"


def _distractors(answer: int) -> list[int]:
    """Three wrong answers near the right one (never negative, never equal to it)."""
    below = answer - 1 if answer >= 1 else answer + 3
    return [answer + 1, below, answer + 10]


def answer_choices(doc: dict) -> list[str]:
    """Four tagged answers; the right one first (the YAML's doc_to_target is 0)."""
    answer = int(doc["answer"])
    return [f"{ANSWER_OPEN}{value}{ANSWER_CLOSE}" for value in [answer, *_distractors(answer)]]
