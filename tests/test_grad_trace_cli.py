"""The trace in training, `analyze`, `compare` and `render` end to end; tracing never changes training."""

import html
import json
import re
from pathlib import Path

import pytest
import torch

from llada_trm import LLaDAConfig
from llada_trm.train import main as train_main
from llada_trm.embedded.assets import TINY_LLADA_PATH
from llada_trm.grad_trace import main as trace_main
from llada_trm.training.arguments import parse_arguments
from llada_trm.training.trainer import Trainer

SMALL = ["--num_synthetic_train", "16", "--num_synthetic_eval", "4", "--eval_max_samples", "0", "--batch_size", "2",
         "--max_recursive_steps", "2", "--min_recursive_steps", "1", "--head_hidden_size", "32", "--logging_steps", "1",
         "--max_length", "160", "--eval_split", "none",
         # The library default, not the embedded profile's 0.0: the summary counts weighted tokens only.
         "--unmasked_chunk_weight", "1.0"]


def records(run_dir, kind):
    lines = (Path(run_dir) / "token_grad_trace.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["record"] == kind]


@pytest.fixture(scope="module")
def embedded_runs(tmp_path_factory):
    """The embedded default (shipped backbone, synthetic data), hybrid and llada_sft, traced at step 2."""
    root = tmp_path_factory.mktemp("traced")
    runs = {"hybrid": root / "hybrid", "llada_sft": root / "sft"}
    assert train_main(["--output_dir", str(runs["hybrid"]), "--max_steps", "2", "--token_grad_trace_every", "2",
                       *SMALL]) == 0
    assert train_main(["--output_dir", str(runs["llada_sft"]), "--max_steps", "2", "--token_grad_trace_every", "2",
                       "--objective", "llada_sft", "--no_freeze_backbone", *SMALL]) == 0
    return runs


def test_training_writes_one_trace_of_every_supervised_token(embedded_runs):
    hybrid = embedded_runs["hybrid"]
    (header,) = records(hybrid, "trace")
    tokens = records(hybrid, "token")
    assert header["step"] == 2 and header["fast_path"] == ["head.out_proj"]
    assert any(p.startswith("head.blocks.1.") for p in header["params"]) and "head.out_proj.weight" in header["params"]
    assert len(tokens) == header["tokens"] == sum(len(s["response"]) for s in records(hybrid, "sample"))
    assert {t["token_type"] for t in tokens} >= {"number", "word", "special"}
    assert all(-1 <= t["alignment"] <= 1 and t["grad_norm"] >= 0 and len(t["step_alignments"]) == 2 for t in tokens)
    assert {t["chunk_masked"] for t in tokens} == {True, False}
    sft_header = records(embedded_runs["llada_sft"], "trace")[0]
    last_block = LLaDAConfig.from_pretrained(TINY_LLADA_PATH).n_layers - 1  # the backbone's last layer
    assert all(f".blocks.{last_block}." in p for p in sft_header["params"]) and sft_header["refinement_steps"] is None


def test_analyze_writes_the_summary(embedded_runs, capsys):
    run = embedded_runs["hybrid"]
    assert trace_main(["analyze", str(run)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "grad_trace_summary.json").read_text())
    assert "Gini" in out and "type number" in out and "masked chunks" in out
    assert summary["overall"]["tokens"] == len(records(run, "token"))
    assert 0 <= summary["overall"]["gini"] < 1 and 0 < summary["overall"]["weight_fraction_80"] <= 1
    assert set(summary["by_chunk"]) == {"masked", "unmasked"} and len(summary["by_refinement_step"]) == 2
    assert [r["step"] for r in summary["over_training"]] == [2]


def test_compare_puts_two_runs_side_by_side(embedded_runs, capsys, tmp_path):
    out_file = tmp_path / "both.json"
    assert trace_main(["compare", str(embedded_runs["hybrid"]), str(embedded_runs["llada_sft"]),
                       "--output", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "hybrid" in out and "llada_sft" in out and " | " in out
    both = json.loads(out_file.read_text())
    assert both["a"]["objective"] == "hybrid" and both["b"]["objective"] == "llada_sft"


def test_render_writes_one_element_per_traced_token_with_its_alignment(embedded_runs, capsys):
    run = embedded_runs["hybrid"]
    assert trace_main(["render", str(run)]) == 0
    page = (run / "grad_trace.html").read_text()
    spans = re.findall(r'<span class="tok[^"]*"[^>]*data-alignment="([^"]*)"', page)
    tokens = records(run, "token")
    assert len(spans) == len(tokens)
    assert [json.loads(html.unescape(a)) for a in spans] == [t["alignment"] for t in tokens]
    assert "<table>" in page and "http" not in page.replace("http-equiv", "")  # self-contained: no remote resource
    sft_page_ok = trace_main(["render", str(embedded_runs["llada_sft"]), "--no_plots"]) == 0
    assert sft_page_ok and 'class="ctx"' in (embedded_runs["llada_sft"] / "grad_trace.html").read_text()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert trace_main(["analyze", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    (tmp_path / "token_grad_trace.jsonl").write_text('{"record": "token"}\nnot json\n')
    assert trace_main(["render", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ":2: not a JSON line" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        trace_main(["summarise", str(tmp_path)])
    assert exit_info.value.code == 2


def test_bad_trace_flags_exit_2_naming_the_flag(tmp_path, capsys):
    assert train_main(["--output_dir", str(tmp_path), "--token_grad_trace_every", "-1"]) == 2
    assert "--token_grad_trace_every" in capsys.readouterr().err
    assert train_main(["--output_dir", str(tmp_path), "--max_steps", "1", "--token_grad_trace_every", "1",
                       "--token_grad_trace_params", "head.nothing_here", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--token_grad_trace_params" in err and "head.nothing_here" in err


def run_losses(backbone_dir, output_dir, *flags):
    trainer = Trainer(parse_arguments([
        "--model_name_or_path", str(backbone_dir), "--output_dir", str(output_dir), "--max_steps", "3",
        "--gradient_accumulation_steps", "2", *SMALL, *flags]))
    trainer.train()
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r], [p.detach().clone() for p in trainer.trainable]


@pytest.mark.parametrize("objective_flags", [[], ["--objective", "llada_sft", "--no_freeze_backbone"]])
def test_tracing_changes_nothing_in_training(backbone_dir, tmp_path, objective_flags):
    plain, plain_weights = run_losses(backbone_dir, tmp_path / "plain", *objective_flags)
    off, off_weights = run_losses(backbone_dir, tmp_path / "off", "--token_grad_trace_every", "0", *objective_flags)
    on, on_weights = run_losses(backbone_dir, tmp_path / "on", "--token_grad_trace_every", "1",
                                "--truncation_preset", "A5", *objective_flags)
    assert not (tmp_path / "off" / "token_grad_trace.jsonl").exists()
    assert len(records(tmp_path / "on", "trace")) == 3
    assert len(plain) == 3 and plain == off  # bitwise, not approximately
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, off_weights))
    # Traced with a random truncation (A5): the trace replays the step's generator without consuming it.
    traced_again, traced_weights = run_losses(backbone_dir, tmp_path / "untraced-A5", "--truncation_preset", "A5",
                                              *objective_flags)
    assert on == traced_again and all(torch.equal(a, b) for a, b in zip(on_weights, traced_weights))
