"""Flags derived from HybridConfig, one validation, one yes/no vocabulary, one split-spec reading."""

import dataclasses
import pickle
from pathlib import Path

import pytest

from llada_trm.data.arguments import DataArgumentError, parse_split
from llada_trm.env_flags import env_flag, parse_bool
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.training.arguments import HYBRID_FLAGS, UsageError, hybrid_config, make_parser, parse_arguments


def test_every_hybrid_setting_is_a_flag_with_the_config_default_and_help():
    config_fields = {f.name: f for f in dataclasses.fields(HybridConfig)}
    actions = make_parser()._option_string_actions
    assert "backbone_name_or_path" not in HYBRID_FLAGS and "backbone_in_checkpoint" not in HYBRID_FLAGS
    for name in HYBRID_FLAGS:
        flag = actions[f"--{name}"]
        assert flag.default == config_fields[name].default
        assert flag.help.startswith(config_fields[name].metadata["help"])


def test_parsed_flags_build_the_config_without_listing_fields():
    args = parse_arguments(["--no_freeze_backbone", "--head_heads", "4", "--checkpoint_refinement_steps", "false",
                            "--chunk_size", "8"])
    config = hybrid_config(args.model)
    assert (config.freeze_backbone, config.head_heads, config.checkpoint_refinement_steps, config.chunk_size) == (
        False, 4, False, 8)
    assert pickle.loads(pickle.dumps(args.model)) == args.model


@pytest.mark.parametrize("flags,message", [
    (["--max_recursive_steps", "0"], "--max_recursive_steps must be at least 1, got 0"),
    (["--min_recursive_steps", "9"], "--min_recursive_steps (9) must not exceed --max_recursive_steps (8)"),
    (["--head_hidden_size", "-2"], "--head_hidden_size must be positive, got -2"),
    (["--step_weighting", "cubic"], "--step_weighting must be one of linear, uniform, got 'cubic'"),
    (["--mask_probability", "1.5"], "--mask_probability must be in [0, 1], got 1.5"),
])
def test_config_checks_become_usage_errors_naming_the_flag(flags, message):
    with pytest.raises(UsageError) as raised:
        parse_arguments(flags)
    assert str(raised.value) == message


def test_one_yes_no_vocabulary():
    assert [parse_bool(w) for w in ("1", " TRUE ", "yes", "on", "0", "False", "no", "off", "maybe", "")] == [
        True, True, True, True, False, False, False, False, None, None]
    assert env_flag("X", {"X": "On"}) and not env_flag("X", {}) and not env_flag("X", {"X": "2"})


def test_split_spec_read_once():
    match = parse_split("train[-200:]")
    assert (match["name"], match["start"], match["stop"]) == ("train", "-200", None)
    with pytest.raises(DataArgumentError, match=r"--eval_split must be a split name"):
        parse_split("train[:x]", "--eval_split")


def test_inspect_keeps_model_name_or_path_as_an_alias_of_backbone():
    from llada_trm.cli.inspect_chunks import parse_args

    for flag in ("--backbone", "--model_name_or_path"):
        args, masking = parse_args([flag, "some/dir", "--mask_probability", "0.5"])
        assert args.backbone == "some/dir" and masking.mask_probability == 0.5


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_run_config_parses(config):
    args = parse_arguments(["--config", str(config)], environ={})
    assert args.model.objective in ("hybrid", "llada_sft")


def test_layout_sft_config_trains_the_whole_backbone_with_llada_sft():
    """Stage 1 of the two-stage recipe (docs/embedded_default.md) is plain LLaDA SFT of the backbone, and stage 2
    reads the directory it writes."""
    repo = Path(__file__).resolve().parents[1]
    args = parse_arguments(["--config", str(repo / "configs" / "layout_sft.yaml")], environ={})
    assert args.model.objective == "llada_sft" and not args.model.freeze_backbone and not args.model.use_lora
    assert f"--model_name_or_path {args.train.output_dir}/model" in (repo / "docs" / "embedded_default.md").read_text()


def test_a_yaml_integer_for_a_float_setting_is_a_float(tmp_path):
    """YAML writes 1 for 1.0; the hybrid's strict config would refuse the int."""
    config = tmp_path / "run.yaml"
    config.write_text("deep_supervision_weight: 1\nunmasked_chunk_weight: 0\nchunk_size: 8\n")
    args = parse_arguments(["--config", str(config)], environ={})
    hybrid = hybrid_config(args.model)
    assert (hybrid.deep_supervision_weight, hybrid.unmasked_chunk_weight, hybrid.chunk_size) == (1.0, 0.0, 8)
    assert type(hybrid.deep_supervision_weight) is float and type(hybrid.chunk_size) is int
