"""The accuracy-vs-speed frontier: threshold decoding in the sampler and the chunk decoder reduces to the fixed
schedules at its extremes, the backbone row-passes the decoders count equal a forward-hook count, FLOPs split
between backbone and head, and the frontier command end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from support import MASK, random_prompt, tiny_model
from support import PROMPTS, tiny_hybrid

from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.inference.chunk_decoding import generate_with_refinement
from llada_trm.inference.exact_match import scored_rows
from llada_trm.inference.frontier import PointError, parse_point, parse_points, score_point
from llada_trm.inference.sampler import PassCounter, generate
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.hybrid import LLaDATRMHybrid

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def count_backbone_rows(backbone) -> tuple[list[int], object]:
    """A forward pre-hook on `backbone` that records the batch size of every call (the oracle for row-passes)."""
    sizes: list[int] = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        sizes.append(len(ids))

    return sizes, backbone.register_forward_pre_hook(record, with_kwargs=True)


def suppress_mask_prediction(model):
    """The backbone never predicts the mask token, so every committed position leaves the masked set."""
    forward = model.forward

    def without_mask(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[..., MASK] = -1e4
        return out

    model.forward = without_mask
    return model


# ------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("gen_length, block_length, cfg_scale", [(8, 8, 0.0), (12, 4, 0.0), (8, 4, 1.0)])
def test_sampler_threshold_above_one_is_one_token_per_step(gen_length, block_length, cfg_scale):
    model, prompt = tiny_model(), random_prompt(3, 5)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # a left-padded row
    scheduled = generate(model, prompt, mask, steps=gen_length, gen_length=gen_length, block_length=block_length,
                         cfg_scale=cfg_scale)
    by_threshold = generate(model, prompt, mask, gen_length=gen_length, block_length=block_length,
                            cfg_scale=cfg_scale, threshold=1.5)
    assert torch.equal(by_threshold, scheduled)
    fewer_steps = generate(model, prompt, mask, steps=gen_length // 4, gen_length=gen_length,
                           block_length=block_length, cfg_scale=cfg_scale)
    assert not torch.equal(fewer_steps, scheduled)  # the comparison can tell schedules apart


def test_sampler_threshold_zero_commits_each_block_in_one_step():
    model, prompt = suppress_mask_prediction(tiny_model()), random_prompt(2, 5)
    sizes, hook = count_backbone_rows(model)
    counter = PassCounter()
    out = generate(model, prompt, gen_length=12, block_length=4, threshold=0.0, counter=counter)
    hook.remove()
    assert sizes == [2, 2, 2]  # three blocks, one forward each
    assert (counter.backbone_forwards, counter.backbone_row_passes) == (3, 6)
    assert (out[:, 5:] != MASK).all()
    # one step per block commits the block's argmax given the blocks before it
    x = torch.cat((prompt, torch.full((2, 12), MASK)), dim=1)
    for block in range(3):
        positions = slice(5 + 4 * block, 9 + 4 * block)
        x[:, positions] = model(input_ids=x).logits[:, positions].argmax(dim=-1)
    assert torch.equal(out, x)


def test_sampler_threshold_takes_a_step_count_between_the_extremes():
    model, prompt = suppress_mask_prediction(tiny_model(std=1.0)), random_prompt(3, 5)  # peaked predictions
    passes = {}
    for threshold in (0.0, 0.5, 1.5):
        counter = PassCounter()
        generate(model, prompt, gen_length=16, block_length=8, threshold=threshold, counter=counter)
        passes[threshold] = counter.backbone_row_passes
    assert passes[0.0] == 3 * 2 and passes[1.5] == 3 * 16
    assert passes[0.0] < passes[0.5] < passes[1.5]


@pytest.mark.parametrize("threshold, cfg_scale", [(None, 0.0), (None, 1.0), (0.3, 0.0), (0.3, 1.0)])
def test_sampler_row_passes_equal_a_forward_hook_count_when_rows_leave_the_batch(threshold, cfg_scale):
    model, prompt = suppress_mask_prediction(tiny_model()), random_prompt(3, 5)  # no mask left before a stop
    options = dict(steps=16, gen_length=16, block_length=4, cfg_scale=cfg_scale, threshold=threshold)
    full = generate(model, prompt, **options)
    others = set(full[1:, 5:13].flatten().tolist())  # the first two blocks of rows 1 and 2
    stop_ids = (next(t for t in full[0, 5:9].tolist() if t not in others),)  # row 0 alone stops after block 0
    sizes, hook = count_backbone_rows(model)
    counter = PassCounter()
    generate(model, prompt, stop_token_ids=stop_ids, counter=counter, **options)
    hook.remove()
    assert counter.backbone_row_passes == sum(sizes) and counter.backbone_forwards == len(sizes)
    assert len(set(sizes)) > 1  # rows did leave the batch


# ------------------------------------------------------------------------------------------ chunk decoder


@pytest.fixture(scope="module")
def hybrid():
    return tiny_hybrid()


@pytest.mark.parametrize("refine, use_cache", [(True, True), (False, True), (True, False)])
def test_chunk_commit_threshold_extremes_equal_the_fixed_rounds(hybrid, refine, use_cache):
    options = dict(max_length=22, enable_refinement=refine, use_cache=use_cache, return_trace=True)
    one_per_round = generate_with_refinement(hybrid, PROMPTS, decode_steps_per_chunk=4, **options)
    above_one = generate_with_refinement(hybrid, PROMPTS, commit_threshold=1.5, **options)
    assert above_one.new_tokens == one_per_round.new_tokens and above_one.trace == one_per_round.trace
    assert above_one.backbone_row_passes == one_per_round.backbone_row_passes
    one_round = generate_with_refinement(hybrid, PROMPTS, decode_steps_per_chunk=1, **options)
    at_zero = generate_with_refinement(hybrid, PROMPTS, commit_threshold=0.0, **options)
    assert at_zero.new_tokens == one_round.new_tokens and at_zero.trace == one_round.trace
    assert one_round.new_tokens != one_per_round.new_tokens  # the comparison can tell the schedules apart


@pytest.mark.parametrize("settings", [dict(decode_steps_per_chunk=2), dict(commit_threshold=0.4),
                                      dict(commit_threshold=0.4, use_cache=False),
                                      dict(commit_threshold=0.4, enable_refinement=False)])
def test_chunk_decoder_row_passes_equal_a_forward_hook_count(hybrid, settings):
    sizes, hook = count_backbone_rows(hybrid.backbone)
    out = generate_with_refinement(hybrid, PROMPTS, max_length=22, return_trace=True, **settings)
    hook.remove()
    assert out.backbone_row_passes == sum(sizes)
    assert len(set(sizes)) > 1  # rows left the batch (budgets differ), or later rounds ran only the open rows
    rounds_run = sum(len(trace) for trace in out.trace)
    assert out.backbone_row_passes == rounds_run  # one row-pass per chunk decode round of a row


def test_chunk_commit_threshold_rounds_follow_the_confidences(hybrid):
    rounds = {}
    for threshold in (0.0, 0.4, 1.5):
        out = generate_with_refinement(hybrid, PROMPTS, max_length=22, commit_threshold=threshold, return_trace=True)
        rounds[threshold] = out.backbone_row_passes
    assert rounds[0.0] < rounds[0.4] < rounds[1.5]


def test_commit_threshold_is_validated(hybrid):
    with pytest.raises(ValueError, match="commit_threshold"):
        generate_with_refinement(hybrid, PROMPTS, max_length=22, commit_threshold=-0.1)
    with pytest.raises(ValueError, match="threshold"):
        generate(tiny_model(), random_prompt(1, 3), gen_length=4, block_length=4, threshold=float("nan"))


# ------------------------------------------------------------------------------------------ frontier points


def test_point_names_parse_and_bad_ones_name_the_problem():
    assert parse_point("sampler/k4", 16).per_step == 4 and parse_point("hybrid/t0.9", 16).threshold == 0.9
    assert parse_point("chunked/r3", 16).per_step == 3  # rounds need not divide the chunk
    for bad in ("sampler/k3", "sampler/r2", "chunked/r17", "hybrid/t-1", "beam/k1", "sampler"):
        with pytest.raises(PointError, match="point"):
            parse_point(bad, 16)
    assert [p.kind for p in parse_points(None, 16, ("sampler", "chunked"))].count("hybrid") == 0
    with pytest.raises(PointError, match="trained head"):
        parse_points("sampler/k1,hybrid/r1", 16, ("sampler", "chunked"))


@pytest.fixture(scope="module")
def shipped_rows(backbone_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    data_args = DataArguments(dataset_name="synthetic", max_samples=3, num_synthetic_eval=200, max_length=256)
    rows, _ = scored_rows(prepare_dataset(data_args, tokenizer, 16, "test").dataset, 3)
    model = LLaDATRMHybrid(HybridConfig(backbone_name_or_path=str(backbone_dir), max_recursive_steps=2,
                                        min_recursive_steps=1, head_hidden_size=32)).eval()
    torch.nn.init.normal_(model.head.out_proj.weight, std=0.3)  # a head that changes the logits
    return model, tokenizer, rows


@pytest.mark.parametrize("name", ["sampler/k1", "sampler/t0.5", "chunked/r2", "chunked/t0.5", "hybrid/t0.5"])
def test_reported_backbone_passes_equal_a_forward_hook_count(shipped_rows, name):
    model, tokenizer, rows = shipped_rows
    sizes, hook = count_backbone_rows(model.backbone)
    result = score_point(parse_point(name, 16), model, tokenizer, rows, 32, batch_size=2, progress=False)
    hook.remove()
    assert result["backbone_passes"] == sum(sizes) > 0
    assert result["tokens_per_pass"] == pytest.approx(result["new_tokens"] / sum(sizes))


def test_flops_per_token_count_the_head_apart(shipped_rows):
    model, tokenizer, rows = shipped_rows
    results = {name: score_point(parse_point(name, 16), model, tokenizer, rows, 32, batch_size=2, flop_sample=2,
                                 progress=False) for name in ("sampler/k4", "chunked/r1", "hybrid/r1")}
    assert all(r["flop_sample"] == 2 and r["backbone_flops_per_token"] > 0 for r in results.values())
    assert results["sampler/k4"]["head_flops_per_token"] == results["chunked/r1"]["head_flops_per_token"] == 0
    assert results["hybrid/r1"]["head_flops_per_token"] > 0
    # the sampler re-runs the whole sequence every step; the chunk decoder runs each chunk against a cache
    assert results["sampler/k4"]["backbone_flops_per_token"] > results["chunked/r1"]["backbone_flops_per_token"]


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def checkpoint(backbone_dir, tmp_path_factory, shipped_rows):
    model, tokenizer, _ = shipped_rows
    path = tmp_path_factory.mktemp("hybrid")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_frontier_command_writes_the_table_and_json(checkpoint, tmp_path, capsys):
    from llada_trm.frontier import main

    points = "sampler/k4,sampler/k16,sampler/t0.5,chunked/r1,hybrid/r16,hybrid/r1,hybrid/t0.9"
    assert main(["--checkpoint", str(checkpoint), "--max_samples", "3", "--sampler_max_samples", "2",
                 "--max_new_tokens", "32", "--points", points, "--flop_sample", "1", "--output_dir", str(tmp_path),
                 "--no_progress"]) == 0
    out, methods_out = capsys.readouterr().out.split("each decoder kind as a method")
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    assert table[0][:3] == ["point", "exact match", "s.e."] and [row[0] for row in table[1:]] == points.split(",")
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved["num_samples"] == 3 and saved["sampler_num_samples"] == 2 and saved["max_new_tokens"] == 32
    assert saved["seconds"] > 0 and saved["chunk_size"] == 16
    for point, row in zip(saved["points"], table[1:]):
        # --sampler_max_samples holds for the sampler below a chunk per step (k16 costs about a pass per chunk)
        assert point["num_samples"] == (2 if point["kind"] == "sampler" and point["per_step"] != 16 else 3)
        assert 0 <= point["accuracy"] <= 1 and point["backbone_passes"] > 0
        assert point["tokens_per_pass"] > 0 and point["head_flops_per_token"] >= 0
        p, n = point["accuracy"], point["num_samples"]
        assert point["standard_error"] == pytest.approx((p * (1 - p) / n) ** 0.5) and row[2] == f"{(p * (1 - p) / n) ** 0.5:.3f}"
    assert {p["name"]: p["kind"] for p in saved["points"]}["hybrid/t0.9"] == "hybrid"
    methods = [[c.strip() for c in line.split("|")[1:-1]] for line in methods_out.splitlines() if line.startswith("| ")]
    assert methods[0][:2] == ["method", "AUP"] and [row[0] for row in methods[1:]] == ["sampler", "chunked", "hybrid"]
    assert set(saved["methods"]) == {"sampler", "chunked", "hybrid"}
    hybrid_points = [p for p in saved["points"] if p["kind"] == "hybrid"]
    assert saved["methods"]["hybrid"]["one_token_exact_match"] == hybrid_points[0]["accuracy"]  # hybrid/r16
    assert saved["methods"]["sampler"]["one_token_exact_match"] is None  # no sampler/k1 among the points


def test_frontier_command_usage_errors_are_one_line(backbone_dir, tmp_path, capsys):
    from llada_trm.frontier import main

    with pytest.raises(SystemExit) as stop:
        main(["--backbone", str(backbone_dir), "--max_samples", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max_samples" in err[0]
    result = subprocess.run([sys.executable, "-m", "llada_trm.frontier", "--backbone", str(backbone_dir),
                             "--points", "hybrid/r1", "--output_dir", str(tmp_path)],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "--points" in lines[0]
    assert not (tmp_path / "frontier.json").exists()
