"""The `eval` extra is optional: without lm-eval the package imports and `python -m llada_trm.lm_eval` says what to
install (exit 2); the shipped offline task reads exactly the problems `python -m llada_trm.evaluate` scores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.embedded.assets import TINY_LLADA_PATH
from llada_trm.inference.exact_match import default_new_token_budget, scored_rows
from llada_trm.inference.harness_task import PROBLEMS_FILE, TASKS_DIR, answer_choices, exact_match

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
WITHOUT_LM_EVAL = "import sys; sys.modules['lm_eval'] = None; "  # an import of lm_eval now fails, as uninstalled


def test_the_package_works_without_lm_eval_and_the_program_says_what_to_install():
    code = WITHOUT_LM_EVAL + ("import llada_trm, llada_trm.inference.harness_task, llada_trm.lm_eval\n"
                              "from llada_trm.lm_eval import main\n"
                              "sys.exit(main(['--model', 'llada_trm', '--tasks', 'llada_trm_arithmetic']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and 'pip install -e ".[eval]"' in result.stderr
    helped = subprocess.run([sys.executable, "-c", WITHOUT_LM_EVAL + "from llada_trm.lm_eval import main; "
                             "sys.exit(main(['--help']))"], capture_output=True, text=True, env=ENV, timeout=300)
    assert helped.returncode == 0 and "usage" in helped.stdout


def _yaml(name: str) -> dict:
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda load, node: load.construct_scalar(node))
    return yaml.load((TASKS_DIR / name).read_text(), Loader=loader)


def test_the_shipped_task_reads_the_evaluated_problems_with_the_evaluate_budget():
    records = [json.loads(line) for line in Path(PROBLEMS_FILE).read_text().splitlines()]
    assert records == generate_split("test", 200, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLADA_PATH)
    data_args = DataArguments(dataset_name="synthetic", max_length=512, max_samples=200, num_synthetic_eval=200)
    rows, unscored = scored_rows(prepare_dataset(data_args, tokenizer, 16, "test").dataset, 200)
    assert unscored == 0 and [row["answer"] for row in rows] == [r["answer"] for r in records]
    task = _yaml("llada_trm_arithmetic.yaml")
    assert task["generation_kwargs"]["max_gen_toks"] == default_new_token_budget(rows, 16)
    for name in ("llada_trm_arithmetic.yaml", "llada_trm_arithmetic_choice.yaml"):
        for value in _yaml(name).values():
            if isinstance(value, str) and value.startswith("llada_trm."):  # every !function names a real function
                module, _, function = value.rpartition(".")
                assert callable(getattr(__import__(module, fromlist=[function]), function)), value


def test_the_task_metric_is_the_projects_exact_match():
    doc = {"answer": "7"}
    assert exact_match(doc, ["a + b = 7.\n<answer>7</answer>\n#### 7"]) == {"exact_match": 1.0}
    assert exact_match(doc, ["<answer> 7 </answer>"]) == {"exact_match": 1.0}
    assert exact_match(doc, ["the answer is 7"]) == {"exact_match": 0.0}
    assert exact_match(doc, ["<answer>8</answer><answer>7</answer>"]) == {"exact_match": 0.0}
    choices = answer_choices({"answer": "0"})
    assert choices[0] == "<answer>0</answer>" and len(set(choices)) == 4
