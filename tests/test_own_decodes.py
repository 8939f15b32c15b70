"""Self-distillation data: the records are the sampler's own decodes, `keep` filters by the answer, and
`python -m llada_trm.distill` writes a dataset directory the trainer reads (ground-truth evaluation splits)."""

import json

import pytest
import yaml

from llada_trm import distill
from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.data.layout import encode_prompt, extract_answer, render_prompt
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.inference.exact_match import is_correct, sampler_decoder
from llada_trm.inference.own_decodes import own_decode_records
from llada_trm.model.loading import load_tokenizer
from llada_trm.model.modeling_llada import LLaDAModelLM

PROBLEMS = generate_split("train", 12, seed=0)


@pytest.fixture(scope="module")
def shipped():
    return LLaDAModelLM.from_pretrained("tiny-llada").eval(), load_tokenizer("tiny-llada")


def test_the_records_are_the_sampler_decodes_and_keep_filters_by_the_answer(shipped):
    backbone, tokenizer = shipped
    every, counts = own_decode_records(backbone, tokenizer, PROBLEMS, 80, 16, keep="all", progress=False)
    texts = sampler_decoder(backbone, tokenizer, 80, 16, threshold=0.9)(
        [encode_prompt(tokenizer, render_prompt(p["question"])) for p in PROBLEMS]).texts
    assert [r["reasoning"] for r in every] == [t for t in texts if t.strip()]
    assert all(r.get("answer") == extract_answer(r["reasoning"]) for r in every)
    right = [p for p, t in zip(PROBLEMS, texts) if is_correct(t, str(p["answer"]))]
    correct, counts_correct = own_decode_records(backbone, tokenizer, PROBLEMS, 80, 16, progress=False)
    assert [r["question"] for r in correct] == [p["question"] for p in right]
    assert counts["correct"] == counts_correct["correct"] == len(right) == counts_correct["kept"]
    assert 0 < len(right) < len(PROBLEMS)  # the shipped backbone gets some right: the filter is not vacuous
    assert counts["tokens_per_pass"] > 1  # threshold decoding commits several tokens per pass


def test_an_unknown_keep_is_an_error(shipped):
    with pytest.raises(ValueError, match="keep"):
        own_decode_records(*shipped, PROBLEMS[:1], 32, 16, keep="best")


def test_distill_writes_a_dataset_the_trainer_reads(tmp_path, shipped):
    out = tmp_path / "own"
    assert distill.main(["--out", str(out), "--num", "12", "--num_eval", "5", "--no_progress"]) == 0
    counts = yaml.safe_load((out / "own_decodes.yaml").read_text())
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(train) == counts["kept"] == counts["correct"] and counts["problems"] == 12
    validation = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert validation == generate_split("validation", 5, 0)  # evaluation stays on ground truth
    tokenizer = shipped[1]
    prepared = prepare_dataset(DataArguments(dataset_path=str(out)), tokenizer, 16, "train")
    assert len(prepared.dataset) == len(train) and prepared.summary.bad == 0
    assert len(prepare_dataset(DataArguments(dataset_path=str(out)), tokenizer, 16, "validation").dataset) == 5


@pytest.mark.parametrize("extra,words", [([], "--overwrite"), (["--num", "0"], "--num must be positive")])
def test_distill_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, extra, words):
    (tmp_path / "train.jsonl").write_text("{}\n")  # an earlier run's output
    with pytest.raises(SystemExit) as stop:
        distill.main(["--out", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and words in err and len(err.splitlines()) == 1
    assert (tmp_path / "train.jsonl").read_text() == "{}\n"  # nothing replaced


def test_distill_with_a_missing_backbone_is_one_line_and_exit_2(tmp_path, capsys):
    assert distill.main(["--out", str(tmp_path / "out"), "--backbone", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
