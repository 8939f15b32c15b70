"""Flags derived from HybridConfig, one validation, one yes/no vocabulary, one split-spec reading."""

import dataclasses
import pickle
from pathlib import Path

import pytest
import yaml

from llada_trm.data.arguments import DataArgumentError, DataArguments, parse_split
from llada_trm.env_flags import env_flag, parse_bool
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.training.arguments import (
    HYBRID_FLAGS, MaskingArguments, TrainArguments, UsageError, embedded_profile, hybrid_config, make_parser,
    parse_arguments,
)

EMBEDDED_PROFILE = embedded_profile()

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_hybrid_setting_is_a_flag_with_the_config_default_and_help():
    """The config's default, or the embedded profile's where the program overrides it."""
    config_fields = {f.name: f for f in dataclasses.fields(HybridConfig)}
    actions = make_parser()._option_string_actions
    assert "backbone_name_or_path" not in HYBRID_FLAGS and "backbone_in_checkpoint" not in HYBRID_FLAGS
    for name in HYBRID_FLAGS:
        flag = actions[f"--{name}"]
        assert flag.default == EMBEDDED_PROFILE.get(name, config_fields[name].default)
        assert flag.help.startswith(config_fields[name].metadata["help"])


def groups(args) -> dict:
    """Every parsed argument group as plain values, so that a difference names its group and field."""
    return {name: dataclasses.asdict(group) for name, group in (
        ("model", args.model), ("data", args.data), ("train", args.train), ("truncation", args.truncation),
        ("weighting", args.weighting))} | {"truncation_flags": args.truncation_flags}


def test_no_flags_run_the_embedded_profile_and_configs_default_yaml_is_that_profile():
    """The documented command without --config trains the profile file's run; configs/default.yaml names the
    profile (`base: embedded`) instead of copying it, and the profile only lists what it changes."""
    assert groups(parse_arguments([], environ={})) == groups(
        parse_arguments(["--config", str(CONFIGS / "default.yaml")], environ={}))
    assert yaml.safe_load((CONFIGS / "default.yaml").read_text()) == {"base": "embedded"}
    library = {f.name: f.default for cls in (HybridConfig, MaskingArguments, DataArguments, TrainArguments)
               for f in dataclasses.fields(cls)}
    assert EMBEDDED_PROFILE and all(library[name] != value for name, value in EMBEDDED_PROFILE.items())
    model = parse_arguments([], environ={}).model
    assert all(getattr(model, name) == value for name, value in EMBEDDED_PROFILE.items() if hasattr(model, name))


def test_a_config_without_base_starts_from_the_library_defaults(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("learning_rate: 0.001\n")
    on_profile = tmp_path / "on_profile.yaml"
    on_profile.write_text("base: embedded\nlearning_rate: 0.001\n")
    library = parse_arguments(["--config", str(plain)], environ={})
    assert library.model.max_recursive_steps == HybridConfig.max_recursive_steps  # the dataclass default
    assert library.train.learning_rate == 0.001
    profiled = parse_arguments(["--config", str(on_profile)], environ={})
    assert profiled.model.max_recursive_steps == EMBEDDED_PROFILE["max_recursive_steps"]
    assert groups(profiled) == groups(parse_arguments(["--learning_rate", "0.001"], environ={}))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("base: tiny\n")
    with pytest.raises(UsageError, match="`base` must be `embedded`"):
        parse_arguments(["--config", str(wrong)], environ={})


def test_one_pass_per_chunk_config_is_the_documented_command():
    """configs/one_pass_per_chunk.yaml trains what docs/embedded_default.md measured with these flags."""
    documented = ["--draft_feedback", "--clean_context", "--mask_probability", "1.0", "--partial_chunk_masking", "false",
                  "--eval_decode_steps_per_chunk", "1", "--num_synthetic_train", "16000", "--learning_rate", "0.001",
                  "--head_hidden_size", "128", "--max_recursive_steps", "4", "--min_recursive_steps", "2",
                  "--output_dir", "runs/one-pass-per-chunk"]
    assert groups(parse_arguments(["--config", str(CONFIGS / "one_pass_per_chunk.yaml")], environ={})) == groups(
        parse_arguments(documented, environ={}))


def test_short_one_pass_per_chunk_config_is_the_documented_command():
    """configs/one_pass_per_chunk_short.yaml trains what docs/embedded_default.md measured with these flags."""
    documented = ["--mask_probability", "1.0", "--num_synthetic_train", "16000", "--learning_rate", "0.001",
                  "--num_synthetic_eval", "500", "--eval_max_samples", "500",
                  "--output_dir", "runs/one-pass-per-chunk-short"]
    parsed = parse_arguments(["--config", str(CONFIGS / "one_pass_per_chunk_short.yaml")], environ={})
    assert groups(parsed) == groups(parse_arguments(documented, environ={}))
    assert (parsed.model.head_hidden_size, parsed.model.max_recursive_steps) == (64, 2)  # the profile's head


NARROWED = ("intermediate_step_positions", "final_step_positions")


def scoring(args) -> tuple[str, str]:
    return tuple(getattr(args.model, name) for name in NARROWED)


def test_profile_scores_at_masked_inputs_unless_something_reads_the_others(tmp_path):
    """The embedded profile scores every step at the masked inputs only (unmasked chunks weigh 0 there); unmasked
    chunks that weigh, truncation or token weighting turn what the profile set back to `all`, without an error; a
    value the user names (flag, abbreviation or config key) is kept, and refused where it cannot work."""
    assert scoring(parse_arguments(["--mask_probability", "0.3"], environ={})) == ("masked", "masked")
    for flags, environ in ((["--unmasked_chunk_weight", "0.5"], {}), ([], {"TRUNCATION_ENABLE": "1"}),
                           (["--truncation_preset", "A2"], {}), (["--loss_weighting", "dft"], {})):
        assert scoring(parse_arguments(flags, environ=environ)) == ("all", "all"), (flags, environ)
    named = parse_arguments(["--loss_weighting", "dft", "--intermediate_step", "masked"], environ={})
    assert scoring(named) == ("masked", "all")
    with pytest.raises(UsageError, match="--final_step_positions masked"):
        parse_arguments(["--final_step_positions", "masked", "--loss_weighting", "dft"], environ={})
    config = tmp_path / "named.yaml"
    config.write_text("base: embedded\nfinal_step_positions: masked\n")
    with pytest.raises(UsageError, match="--final_step_positions masked"):
        parse_arguments(["--config", str(config)], environ={"TRUNCATION_ENABLE": "1"})
    library = tmp_path / "library.yaml"  # no `base`: the library's `all`, whatever else is set
    library.write_text("loss_weighting: dft\n")
    assert scoring(parse_arguments(["--config", str(library)], environ={})) == ("all", "all")


def test_embedded_profile_booleans_turn_off_like_any_other():
    model = parse_arguments([], environ={}).model
    assert model.clean_context and model.draft_feedback and model.checkpoint_refinement_steps is False
    for flags in (["--no_clean_context"], ["--clean_context", "false"]):
        assert parse_arguments(flags, environ={}).model.clean_context is False
    assert parse_arguments(["--checkpoint_refinement_steps", "true"], environ={}).model.checkpoint_refinement_steps


def test_llada8b_config_keeps_the_8b_sizes_without_the_embedded_profile():
    """The 8B config has no `base`: it starts from the library defaults, and states its sizes."""
    path = str(CONFIGS / "llada8b_natural_reasoning.yaml")
    args = parse_arguments(["--config", path], environ={})
    m, t = args.model, args.train
    assert (m.max_recursive_steps, m.min_recursive_steps, m.latent_steps) == (2, 1, 1)
    assert (m.intermediate_step_positions, m.final_step_positions) == ("masked", "masked")
    assert m.checkpoint_refinement_steps is True and m.head_hidden_size is None  # the profile's is 64
    assert (m.deep_supervision_weight, m.partial_chunk_masking) == (0.3, False)
    assert (t.eval_decode_steps_per_chunk, t.batch_size, t.learning_rate) == (1, 4, 3e-4)
    assert (m.model_name_or_path, args.data.dataset_name) == ("GSAI-ML/LLaDA-8B-Instruct", "natural_reasoning")
    library_synthetic = next(f.default for f in dataclasses.fields(DataArguments) if f.name == "num_synthetic_train")
    assert args.data.num_synthetic_train == library_synthetic  # nothing of the embedded profile leaks in


def test_parsed_flags_build_the_config_without_listing_fields():
    args = parse_arguments(["--no_freeze_backbone", "--head_heads", "4", "--checkpoint_refinement_steps", "false",
                            "--chunk_size", "8"])
    config = hybrid_config(args.model)
    assert (config.freeze_backbone, config.head_heads, config.checkpoint_refinement_steps, config.chunk_size) == (
        False, 4, False, 8)
    assert pickle.loads(pickle.dumps(args.model)) == args.model


@pytest.mark.parametrize("flags,message", [
    (["--max_recursive_steps", "0"], "--max_recursive_steps must be at least 1, got 0"),
    (["--head_reads_layers", "0"], "--head_reads_layers must be at least 1, got 0"),
    (["--min_recursive_steps", "5"], "--min_recursive_steps (5) must not exceed --max_recursive_steps (2)"),
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
    from llada_trm.inspect import parse_args

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


def test_every_training_and_decoding_flag_has_exactly_one_default():
    """Walk the parsers: a training flag's default is its dataclass field's, or the embedded profile's; a decoding
    flag of any program that decodes is DecodingSettings' field, default and help."""
    from llada_trm import evaluate, frontier, generate
    from llada_trm.inference.decoding_settings import DecodingSettings
    from llada_trm.training.arguments import PARSED_TYPES

    library = {f.name: f.default for cls in PARSED_TYPES for f in dataclasses.fields(cls)}
    parser = make_parser()
    flags = {a.dest for a in parser._actions if a.dest in library}
    assert flags == set(library)  # every field is a flag
    for name in flags:  # get_default: what argparse fills in, whichever of --x / --no_x defined it
        assert parser.get_default(name) == EMBEDDED_PROFILE.get(name, library[name]), name
    settings = {f.name: f for f in dataclasses.fields(DecodingSettings)}
    decoding_flags = 0
    for program in (generate, evaluate, frontier):
        program_parser = program.make_parser()
        for action in program_parser._actions:
            if program is not generate and action.dest == "max_length":  # the data's setting: problems as in training
                assert program_parser.get_default("max_length") == library["max_length"]
            elif action.dest in settings:
                decoding_flags += 1
                assert program_parser.get_default(action.dest) == settings[action.dest].default, action.dest
                assert action.help == settings[action.dest].metadata["help"]
    assert decoding_flags >= 8
    # The old spellings still reach the one setting.
    args = generate.parse_args(["--backbone", "tiny-llada", "--prompt", "q", "--no_refinement", "--trace"])
    assert args.enable_refinement is False and args.return_trace is True
