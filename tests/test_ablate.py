"""The ablation runner: table and summary from plain data, flag checks, a tiny real run of two rungs."""

import json
import sys

import pytest

from llada_trm.ablate import (
    COLUMNS,
    CURVES_FILE,
    SUMMARY_FILE,
    format_table,
    main,
    plot_curves,
    rung_row,
    tail_mean,
    write_summary,
)


def step_record(step, loss, ratio=0.0, seqs=0.0, raw=None, empty=0):
    return {"step": step, "loss": loss, "learning_rate": 1e-3, "empty_steps": empty, "skipped_steps": 0,
            "truncation/batch_ratio": ratio, "truncation/truncated_seqs": seqs,
            "truncation/raw_loss": loss if raw is None else raw}


def trainer_summary(eval_loss, ppl, accuracy, empty=0, skipped=0, steps=20):
    return {"checkpoint": "c", "model": "m", "eval_loss": eval_loss, "eval_perplexity": ppl,
            "eval_accuracy_hybrid_refined": accuracy, "eval_accuracy_backbone_llada_sampler": 0.1,
            "state": {"global_step": steps, "empty_steps": empty, "skipped_steps": skipped}}


def synthetic_rows():
    # 20 steps each: the last 10% are steps 19 and 20.
    baseline = [step_record(s, 3.0 if s < 19 else 1.0) for s in range(1, 21)]
    a2 = [step_record(s, 2.0 if s < 19 else 0.5, ratio=0.25, seqs=3.0, raw=4.0) for s in range(1, 21)]
    a2.append({"step": 20, "eval_loss": 9.9, "eval_perplexity": 99.0})  # evaluation records are not training
    return [rung_row("baseline", trainer_summary(1.25, 3.5, 0.5), baseline),
            rung_row("A2", trainer_summary(1.75, 5.75, 0.625, empty=2, skipped=1), a2)]


def table_cells(table: str) -> list[dict]:
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header, *body = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(header, cells)) for cells in body]


def test_tail_mean_takes_the_last_tenth_and_at_least_one_value():
    assert tail_mean(list(range(1, 21))) == 19.5
    assert tail_mean([4.0, 2.0]) == 2.0
    assert tail_mean([]) is None


def test_table_puts_each_number_in_its_column():
    cells = table_cells(format_table(synthetic_rows()))
    assert list(cells[0]) == [header for _, header, _ in COLUMNS]
    baseline, a2 = cells
    assert baseline == {"rung": "baseline", "train loss": "1.0000", "raw loss": "1.0000", "eval loss": "1.2500",
                        "eval ppl": "3.500", "trunc. ratio": "0.0000", "trunc. seqs": "0.00", "accuracy": "0.500",
                        "empty steps": "0", "skipped steps": "0"}
    assert a2 == {"rung": "A2", "train loss": "0.5000", "raw loss": "4.0000", "eval loss": "1.7500",
                  "eval ppl": "5.750", "trunc. ratio": "0.2500", "trunc. seqs": "3.00", "accuracy": "0.625",
                  "empty steps": "2", "skipped steps": "1"}


def test_empty_steps_do_not_enter_the_train_loss_and_missing_values_print_as_dash():
    records = [step_record(1, 2.0), step_record(2, 0.0, empty=1)]
    row = rung_row("A1", {"error": "3 optimiser steps in a row had a non-finite loss"}, records)
    assert row["train_loss"] == 2.0 and row["eval_loss"] is None
    table = format_table([row])
    assert table_cells(table)[0]["eval loss"] == "-" and "A1: failed: 3 optimiser steps" in table


def test_summary_json_holds_every_rung(tmp_path):
    rows = synthetic_rows()
    path = write_summary(rows, tmp_path / SUMMARY_FILE, {"epochs": 1})
    summary = json.loads(path.read_text())
    assert [r["rung"] for r in summary["rungs"]] == ["baseline", "A2"]
    assert summary["rungs"][1]["batch_ratio"] == 0.25 and summary["rungs"][1]["train_loss"] == 0.5
    assert summary["settings"] == {"epochs": 1}


def test_plot_without_matplotlib_prints_the_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plot_curves({"baseline": [step_record(1, 1.0)]}, tmp_path / CURVES_FILE) is None
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not (tmp_path / CURVES_FILE).exists()


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--rungs", "baseline,A9"], "known rungs: baseline, A1, A1b, A2, A3, A4, A5"),
        (["--rungs", "A2,a2"], "once"),
        (["--epochs", "0"], "--epochs"),
        (["--extra", "--output_dir elsewhere"], "--output_dir"),
        (["--extra", "--batch_size -1"], "--batch_size"),
    ],
)
def test_bad_flags_exit_2_without_traceback(flags, fragment, tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / SUMMARY_FILE).exists()


def test_two_rungs_train_and_are_summarised(backbone_dir, tmp_path, capsys):
    extra = ("--max_steps 2 --num_synthetic_train 16 --num_synthetic_eval 4 --batch_size 4 --eval_max_samples 2 "
             "--eval_max_new_tokens 48 --max_recursive_steps 2 --min_recursive_steps 1 --head_hidden_size 32 "
             "--max_length 192")
    argv = ["--epochs", "1", "--output_dir", str(tmp_path), "--rungs", "baseline,A2",
            "--model_name_or_path", str(backbone_dir), "--extra", extra]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {cells["rung"]: cells for cells in table_cells(out[out.index("| rung"):])}
    assert set(rows) == {"baseline", "A2"}

    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert [r["rung"] for r in summary["rungs"]] == ["baseline", "A2"]
    for row in summary["rungs"]:
        assert row["steps"] == 2 and row["error"] is None
        assert row["train_loss"] > 0 and row["eval_loss"] > 0 and row["eval_perplexity"] >= 1
        assert 0.0 <= row["batch_ratio"] <= 1.0 and row["accuracy_refined"] is not None
        assert (tmp_path / row["rung"] / "metrics.jsonl").exists()
    assert summary["rungs"][0]["batch_ratio"] == 0.0  # baseline masks nothing
    assert "--truncation_preset" not in summary["settings"]["extra"]

    assert main(argv) == 2  # the rung directories exist now: refuse without --overwrite
    assert "--overwrite" in capsys.readouterr().err

    pytest.importorskip("matplotlib")
    assert (tmp_path / CURVES_FILE).stat().st_size > 0
