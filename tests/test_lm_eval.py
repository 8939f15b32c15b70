"""The lm-evaluation-harness model `llada_trm`: on the shipped task and a short run's checkpoint it scores what
`python -m llada_trm.evaluate` scores, problem by problem; likelihood requests go through the Monte Carlo estimate;
bad model args are one clear error. Skipped without the `eval` extra."""

import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llada_trm.data.dataset import DataArguments, prepare_dataset  # noqa: E402
from llada_trm.inference.chunk_decoding import generate_with_refinement  # noqa: E402
from llada_trm.inference.exact_match import is_correct, prompt_ids_of, sampler_decoder, scored_rows  # noqa: E402
from llada_trm.inference.harness import (  # noqa: E402
    HarnessArgumentError,
    LLaDATRMHarnessModel,
    parse_model_args,
    training_prompt_text,
)
from llada_trm.inference.harness_task import TASKS_DIR  # noqa: E402
from llada_trm.inference.likelihood import masked_diffusion_loglikelihood  # noqa: E402

PROBLEMS, BUDGET = 10, 96
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
DECODERS = {"sampler/k1": "backbone_llada_sampler", "chunked/r1": "backbone_chunked", "hybrid/r1": "hybrid_refined"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The model directory of a short run on the embedded backbone (4 optimiser steps)."""
    from llada_trm.train import main

    out = tmp_path_factory.mktemp("run")
    assert main(["--model_name_or_path", "tiny-llada", "--output_dir", str(out), "--num_synthetic_train", "32",
                 "--num_synthetic_eval", "8", "--batch_size", "4", "--max_recursive_steps", "2",
                 "--min_recursive_steps", "1", "--head_hidden_size", "32", "--eval_max_samples", "0",
                 "--max_length", "192", "--learning_rate", "0.01", "--max_steps", "4"]) == 0
    return out / "model"


def run_harness(model_args: dict, tasks: list[str], limit: int) -> dict:
    return lm_eval.simple_evaluate(model="llada_trm", model_args=model_args, tasks=tasks, limit=limit,
                                   batch_size=8, log_samples=True,
                                   task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))


def per_problem(results: dict, task: str) -> list[float]:
    return [s["exact_match"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow
def test_the_harness_scores_like_evaluate_to_the_problem(checkpoint, tmp_path):
    from llada_trm.evaluate import main

    report = tmp_path / "eval.json"
    assert main(["--checkpoint", str(checkpoint), "--max_samples", str(PROBLEMS), "--max_new_tokens", str(BUDGET),
                 "--output_json", str(report), "--no_progress"]) == 0
    evaluation = json.loads(report.read_text())["decoders"]
    model = LLaDATRMHarnessModel(checkpoint=str(checkpoint))
    data_args = DataArguments(dataset_name="synthetic", max_length=512, max_samples=PROBLEMS, num_synthetic_eval=200)
    rows, _ = scored_rows(prepare_dataset(data_args, model.tokenizer, 16, "test").dataset, PROBLEMS)
    seen = set()
    for point, name in DECODERS.items():
        results = run_harness({"checkpoint": str(checkpoint), "decoder": point}, ["llada_trm_arithmetic"], PROBLEMS)
        scores = per_problem(results, "llada_trm_arithmetic")
        # the reference: the project's decoders on the prepared rows, in evaluate's batches
        prompts = [prompt_ids_of(row) for row in rows]
        if point.startswith("sampler"):
            texts = sampler_decoder(model.model.backbone, model.tokenizer, BUDGET, 16)(prompts).texts
        else:
            texts = [text for start in range(0, len(prompts), 8) for text in generate_with_refinement(
                model.model, prompts[start:start + 8], tokenizer=model.tokenizer, max_new_tokens=BUDGET,
                enable_refinement=point.startswith("hybrid")).texts]
        assert scores == [float(is_correct(text, row["answer"])) for text, row in zip(texts, rows)], point
        assert sum(scores) == evaluation[name]["correct"], point
        cost = results["config"]["llada_trm"]["decoding_cost"]["llada_trm_arithmetic"]
        assert cost["new_tokens"] == evaluation[name]["new_tokens"], point
        assert cost["backbone_passes"] == evaluation[name]["backbone_passes"], point
        seen |= set(scores)
    assert seen == {0.0, 1.0}, "every decoder right everywhere or wrong everywhere compares nothing"


def test_likelihood_requests_are_the_monte_carlo_estimate(checkpoint):
    model = LLaDATRMHarnessModel(checkpoint=str(checkpoint), mc_num=6, mc_batch_size=4, seed=5)
    context = "Question: Mia has 3 apples. Mia buys 4 more apples. How many apples does Mia have now?\n\n" \
              "Let's solve this step by step:\nMia starts with 3 apples.\nMia buys 4: 3 + 4 = 7.\n"
    requests = [Instance("loglikelihood", {}, (context, f"<answer>{n}</answer>"), i, ("t", 0, 1))
                for i, n in enumerate((7, 9))]
    (right, _), (wrong, _) = model.loglikelihood(requests)
    context_ids, continuation_ids = model.likelihood_pair(*requests[0].args)
    assert context_ids[0] == model.tokenizer.bos_token_id
    assert right == pytest.approx(masked_diffusion_loglikelihood(model.model.backbone, context_ids, continuation_ids,
                                                                 6, 5), rel=1e-6)
    assert right > wrong
    assert model.loglikelihood(requests[:1])[0][0] == right  # the same draws whatever else ran
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        model.loglikelihood_rolling(requests)


def test_the_multiple_choice_task_runs_offline(checkpoint):
    results = run_harness({"checkpoint": str(checkpoint), "mc_num": 4}, ["llada_trm_arithmetic_choice"], 3)
    assert 0 <= results["results"]["llada_trm_arithmetic_choice"]["acc,none"] <= 1
    assert results["config"]["llada_trm"]["decoding_cost"]["llada_trm_arithmetic_choice"]["likelihood_row_passes"] > 0


def test_training_prompt_style_renders_the_training_layout():
    assert training_prompt_text("Mia has 3 apples.") == (
        "Question: Mia has 3 apples.\n\nLet's solve this step by step:\n", False)
    text, dropped = training_prompt_text("Question: a?\nAnswer: 1\n\nQuestion: Mia has 3 apples.\nAnswer:")
    assert text.startswith("Question: Mia has 3 apples.\n\n") and dropped


@pytest.mark.parametrize("args,named", [
    ({"checkpoint": "x", "colour": "red"}, "colour"),
    ({"checkpoint": "x", "mc_num": "many"}, "mc_num"),
    ({"checkpoint": "x", "prompt_style": "chat"}, "prompt_style"),
    ({}, "checkpoint=DIR"),
])
def test_bad_model_args_name_themselves(args, named):
    with pytest.raises(HarnessArgumentError, match=named):
        parse_model_args(args)


def test_bad_decoders_name_themselves(checkpoint):
    with pytest.raises(HarnessArgumentError, match="decoder=sampler/x3"):
        LLaDATRMHarnessModel(checkpoint=str(checkpoint), decoder="sampler/x3")
    with pytest.raises(HarnessArgumentError, match="decoder=hybrid/r1 needs a trained head"):
        LLaDATRMHarnessModel(backbone="tiny-llada", decoder="hybrid/r1")
    with pytest.raises(HarnessArgumentError, match="checkpoint="):
        LLaDATRMHarnessModel(checkpoint="/no/such/dir")


@pytest.mark.slow
def test_the_program_turns_a_bad_model_arg_into_one_line(checkpoint):
    result = subprocess.run([sys.executable, "-m", "llada_trm.lm_eval", "--model", "llada_trm", "--model_args",
                             f"checkpoint={checkpoint},decoder=bogus", "--tasks", "llada_trm_arithmetic"],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "decoder=bogus" in errors[0]


@pytest.mark.slow
def test_two_processes_shard_the_requests_and_report_what_one_process_reports(checkpoint, tmp_path):
    """torchrun (as `accelerate launch` starts it) with two CPU processes: the same scores and the summed cost."""
    args = {"checkpoint": str(checkpoint), "decoder": "chunked/r1", "mc_num": 4}
    single = run_harness(args, ["llada_trm_arithmetic", "llada_trm_arithmetic_choice"], 6)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llada_trm.lm_eval",
               "--model", "llada_trm", "--model_args", ",".join(f"{k}={v}" for k, v in args.items()),
               "--tasks", "llada_trm_arithmetic,llada_trm_arithmetic_choice", "--limit", "6", "--batch_size", "8",
               "--device", "cpu", "--output_path", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    [written] = list(tmp_path.rglob("results_*.json"))
    both = json.loads(written.read_text())
    for task, metric in (("llada_trm_arithmetic", "exact_match,none"), ("llada_trm_arithmetic_choice", "acc,none")):
        assert both["results"][task][metric] == single["results"][task][metric]
    assert both["config"]["llada_trm"]["decoding_cost"] == single["config"]["llada_trm"]["decoding_cost"]
    assert both["config"]["llada_trm"]["decoding_cost"]["llada_trm_arithmetic"]["requests"] == 6
