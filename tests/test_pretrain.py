"""The backbone rebuild (`python -m llada_trm.pretrain`): a plain run writes to runs/ and leaves the shipped backbone
alone, the result loads as a backbone, the asset is replaced only on request, and each stage trains with the
training program's objectives, whose losses equal plain references written here."""

import hashlib
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config, shipped_vocab_size

from llada_trm import LLaDAModelLM
from llada_trm import pretrain
from llada_trm.cli import EXIT_USAGE
from llada_trm.data.collator import pad_batch
from llada_trm.embedded.assets import TINY_LLADA_PATH
from llada_trm.model.integrity import verify_manifest
from llada_trm.model.loading import load_tokenizer
from llada_trm.training.arguments import parse_arguments
from llada_trm.training.diffusion import clean_context_inputs, forward_mask
from llada_trm.training.objectives import BlockSFTObjective, LLaDAPretrainObjective, LLaDASFTObjective
from llada_trm.training.trainer import Trainer

# What makes a rebuild short: few steps, problems and parameters. Nothing else is given.
SHORT = ["--steps", "2", "--instruct_steps", "2", "--block_steps", "2", "--num_train", "48", "--num_eval", "2",
         "--batch_size", "8", "--d_model", "32", "--n_heads", "2", "--n_layers", "1", "--mlp_hidden_size", "64"]


def file_hashes(directory: Path) -> dict[str, str]:
    return {path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_a_plain_rebuild_writes_to_runs_and_leaves_the_shipped_backbone_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = file_hashes(TINY_LLADA_PATH)
    assert "model.safetensors" in before
    assert pretrain.main(SHORT) == 0
    assert file_hashes(TINY_LLADA_PATH) == before  # same files, same bytes, nothing added
    out = tmp_path / "runs" / "tiny-llada"
    assert sorted(p.name for p in out.iterdir()) == ["block", "init", "instruct", "model", "pretrain"]
    model_dir = out / "model"
    verify_manifest(model_dir)
    assert (model_dir / "pretrain_report.json").is_file()
    backbone, tokenizer = LLaDAModelLM.from_pretrained(model_dir), load_tokenizer(model_dir)
    assert backbone.config.d_model == 32 and backbone.config.mask_token_id == tokenizer.mask_token_id
    # Each stage's trained backbone is the next one's start, and the last is what model/ holds.
    saved = LLaDAModelLM.from_pretrained(out / "block" / "model").state_dict()
    assert all(torch.equal(saved[name], value) for name, value in backbone.state_dict().items())
    # It is a backbone for the training program: one hybrid step on it.
    args = parse_arguments(["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "hybrid"),
                            "--max_steps", "1", "--num_synthetic_train", "8", "--num_synthetic_eval", "2",
                            "--batch_size", "4", "--eval_max_samples", "0", "--max_length", "192"], environ={})
    assert Trainer(args).train()["state"]["global_step"] == 1


def test_update_shipped_asset_replaces_the_backbone_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asset = tmp_path / "assets" / "tiny-llada"
    asset.mkdir(parents=True)
    (asset / "stale.txt").write_text("the previous release\n")
    monkeypatch.setattr(pretrain, "TINY_LLADA_PATH", asset)
    assert pretrain.main([*SHORT, "--block_steps", "0", "--output_dir", "rebuild", "--update_shipped_asset"]) == 0
    assert file_hashes(asset) == file_hashes(tmp_path / "rebuild" / "model")  # the rebuilt backbone, stale file gone
    assert sorted(p.name for p in asset.parent.iterdir()) == ["tiny-llada"]  # no staging or old copy left
    verify_manifest(asset)
    LLaDAModelLM.from_pretrained(asset)


@pytest.mark.parametrize("extra", [[], ["--update_shipped_asset"]])
def test_the_shipped_backbone_is_never_an_output_dir(extra, capsys):
    before = file_hashes(TINY_LLADA_PATH)
    for target in (TINY_LLADA_PATH, TINY_LLADA_PATH.parent, TINY_LLADA_PATH / "sub"):
        with pytest.raises(SystemExit) as stop:
            pretrain.parse_args(["--output_dir", str(target), *extra])
        assert stop.value.code == EXIT_USAGE
        message = capsys.readouterr().err.strip()
        assert message.startswith("error: --output_dir") and "\n" not in message
        assert ("must be elsewhere" if extra else "add --update_shipped_asset") in message
    assert file_hashes(TINY_LLADA_PATH) == before


def test_an_earlier_rebuild_is_kept_unless_overwrite_is_asked(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}\n")
    assert pretrain.main([*SHORT, "--output_dir", str(tmp_path)]) == EXIT_USAGE
    message = capsys.readouterr().err.strip()
    assert "holds an earlier rebuild (model)" in message and "--overwrite_output_dir" in message
    assert (tmp_path / "model" / "config.json").read_text() == "{}\n"


# ---------------------------------------------------------------------- the stages' losses
def stage_args(**overrides) -> Namespace:
    args = pretrain.parse_args(["--num_train", "24", "--batch_size", "4"])
    return Namespace(**{**vars(args), **overrides})


def random_backbone(tokenizer) -> LLaDAModelLM:
    torch.manual_seed(0)
    vocab = shipped_vocab_size(tokenizer)
    return LLaDAModelLM(make_config(vocab_size=vocab, embedding_size=vocab, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                    mask_token_id=tokenizer.mask_token_id)).eval()


def first_rows(rows, count: int) -> list[dict]:
    return [rows[i] for i in range(count)]


def masked_ce_over_p(logits, targets, masked, p) -> torch.Tensor:
    """sum over the masked positions of CE / p, one position at a time."""
    total = torch.zeros(())
    for i in torch.nonzero(masked).flatten().tolist():
        total = total + F.cross_entropy(logits[i][None], targets[i][None]) / p[i]
    return total


def test_the_pretraining_stage_is_llada_pretraining_on_every_token_but_bos(shipped_tokenizer):
    rows, objective, collator = pretrain.stage_data(stage_args(), "pretrain", shipped_tokenizer)
    assert type(objective) is LLaDAPretrainObjective and collator is None
    model = random_backbone(shipped_tokenizer)
    batch = pad_batch(first_rows(rows, 4), shipped_tokenizer.pad_token_id, pretrain.CHUNK_SIZE)
    result = objective(model, batch, torch.Generator().manual_seed(3))
    ids = batch["input_ids"]
    assert (ids[:, 0] == shipped_tokenizer.bos_token_id).all() and batch["attention_mask"].all()
    noisy, masked, p = forward_mask(ids, batch["labels"] != -100, shipped_tokenizer.mask_token_id,
                                    torch.Generator().manual_seed(3))
    assert (batch["labels"][:, 0] == -100).all() and (batch["labels"][:, 1:] == ids[:, 1:]).all()
    assert masked.any() and not masked[:, 0].any()
    with torch.no_grad():  # LLaDA: sum of CE / p over masked tokens, divided by B x L
        expected = sum(masked_ce_over_p(model(input_ids=noisy[r][None]).logits[0], ids[r], masked[r],
                                        p[r].expand(ids.shape[1])) for r in range(len(ids))) / ids.numel()
    torch.testing.assert_close(result.loss_sum.detach() / result.count, expected, rtol=1e-5, atol=1e-6)
    assert float(result.count) == ids.numel()


def test_the_instruct_stage_is_llada_sft_on_the_response(shipped_tokenizer):
    rows, objective, collator = pretrain.stage_data(stage_args(), "instruct", shipped_tokenizer)
    assert type(objective) is LLaDASFTObjective and collator is None
    model = random_backbone(shipped_tokenizer)
    batch = pad_batch(first_rows(rows, 4), shipped_tokenizer.pad_token_id, pretrain.CHUNK_SIZE)
    result = objective(model, batch, torch.Generator().manual_seed(4))
    ids, is_response = batch["input_ids"], batch["labels"] != -100
    prompt_lengths = (~is_response).sum(dim=1)
    assert (prompt_lengths > 5).all() and (is_response.sum(dim=1) == ids.shape[1] - prompt_lengths).all()
    noisy, masked, p = forward_mask(ids, is_response, shipped_tokenizer.mask_token_id, torch.Generator().manual_seed(4))
    with torch.no_grad():  # per document: CE / p over its masked response tokens / the response length; mean
        per_row = [masked_ce_over_p(model(input_ids=noisy[r][None]).logits[0], ids[r], masked[r],
                                    p[r].expand(ids.shape[1])) / is_response[r].sum() for r in range(len(ids))]
    torch.testing.assert_close(result.loss_sum.detach() / result.count, torch.stack(per_row).mean(),
                               rtol=1e-5, atol=1e-6)


def block_reference(model, row: dict, masked: torch.Tensor, p: torch.Tensor, mask_id: int) -> torch.Tensor:
    """One layout row: for each reasoning chunk k, [prompt, clean chunks < k, noisy chunk k] alone through the
    backbone; CE / p at chunk k's masked tokens; the sum over chunks / the response length."""
    real = row["attention_mask"].bool()
    ids, chunk_index, masked, p = row["input_ids"][real], row["chunk_index"][real], masked[real], p[real]
    total = torch.zeros(())
    for k in range(int(chunk_index.max()) + 1):
        before, here = chunk_index < k, chunk_index == k
        inputs = torch.cat((ids[before], torch.where(masked[here], mask_id, ids[here])))[None]
        index = torch.cat((chunk_index[before], chunk_index[here]))[None]
        logits = model(input_ids=inputs, chunk_index=index).logits[0, -int(here.sum()):]
        total = total + masked_ce_over_p(logits, ids[here], masked[here], p[here])
    return total / (chunk_index >= 0).sum()


def test_the_block_stage_is_full_attention_sft_on_half_the_rows_and_block_sft_on_the_other(shipped_tokenizer):
    """The block stage's loss is the mean over a batch's rows of LLaDA SFT with full attention (even rows, the
    response EOS-filled to a random length) and of the trainer's block-SFT objective (odd rows), each against a
    plain reference: one row at a time, and for block SFT one chunk at a time."""
    mask_id, eos = shipped_tokenizer.mask_token_id, shipped_tokenizer.eos_token_id
    rows, objective, collator = pretrain.stage_data(stage_args(), "block", shipped_tokenizer)
    assert isinstance(objective.full_attention, LLaDASFTObjective) and type(objective.block) is BlockSFTObjective
    features = first_rows(rows, 5)
    batch = collator(features)
    assert len(batch["input_ids"]) == 3 and len(batch["block"]["input_ids"]) == 2
    model = random_backbone(shipped_tokenizer)
    result = objective(model, batch, torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)  # the draws in the objective's order: full attention, then block
    full_ids, is_response = batch["input_ids"], batch["is_response"]
    noisy, full_masked, full_p = forward_mask(full_ids, is_response, mask_id, generator)
    block = batch["block"]
    block_response = block["labels"] != -100
    _, block_masked, block_p = clean_context_inputs(block["labels"].where(block_response, block["input_ids"]),
                                                    block["attention_mask"], block["chunk_index"], block_response,
                                                    mask_id, generator)
    assert full_masked.any() and block_masked.any()
    per_row = []
    with torch.no_grad():
        for r in range(len(full_ids)):
            real = batch["attention_mask"][r].bool()
            reasoning = [t for t in features[2 * r]["labels"] if t != -100]
            response = full_ids[r][is_response[r]].tolist()
            assert response[:len(reasoning)] == reasoning and set(response[len(reasoning):]) <= {eos}
            logits = model(input_ids=noisy[r][real][None]).logits[0]
            per_row.append(masked_ce_over_p(logits, full_ids[r][real], full_masked[r][real],
                                            full_p[r].expand(int(real.sum()))) / is_response[r].sum())
        for r in range(len(block["input_ids"])):
            row = {key: value[r] for key, value in block.items() if key != "num_chunks"}
            per_row.append(block_reference(model, row, block_masked[r], block_p[r], mask_id))
    torch.testing.assert_close(result.loss_sum.detach() / result.count, torch.stack(per_row).mean(),
                               rtol=1e-5, atol=1e-6)
    assert float(result.count) == 5


def test_the_block_stage_batches_are_drawn_again_on_resume(shipped_tokenizer):
    rows, _, collator = pretrain.stage_data(stage_args(), "block", shipped_tokenizer)
    features = first_rows(rows, 4)
    collator.set_epoch(1)
    first, again = collator(features), collator(features)
    assert torch.equal(first["input_ids"], again["input_ids"])
    collator.set_epoch(2)
    lengths = {int(collator(features)["attention_mask"].sum())} | {int(first["attention_mask"].sum())}
    for epoch in range(3, 8):
        collator.set_epoch(epoch)
        lengths.add(int(collator(features)["attention_mask"].sum()))
    assert len(lengths) > 1  # the random EOS fill changes with the epoch
