"""Block SFT (clean-context block diffusion): the loss equals a per-chunk reference that runs each noisy chunk after
the prompt and the clean chunks before it; the embedded rebuild's full-attention batches have the stated tails."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config

from llada_trm import LLaDAModelLM
from llada_trm.merge_adapters import main as merge_main
from llada_trm.model.loading import load_tokenizer
from llada_trm.pretrain import full_attention_batch
from llada_trm.data.collator import pad_batch
from llada_trm.data.dataset import layout_sample
from llada_trm.training.diffusion import MASK_EPS, clean_context_inputs
from llada_trm.training.objectives import BlockSFTObjective

CHUNK, MASK, EOS = 4, 2, 1


def layout_rows(generator: torch.Generator) -> list[dict]:
    rows = []
    for prompt_length, reasoning_length in ((5, 9), (3, 4), (6, 12)):
        prompt = [0] + torch.randint(3, 64, (prompt_length - 1,), generator=generator).tolist()
        reasoning = torch.randint(3, 64, (reasoning_length,), generator=generator).tolist()
        rows.append(layout_sample(prompt, reasoning, chunk_size=CHUNK, max_length=64, pad_token_id=EOS,
                                  eos_token_id=EOS))
    return rows


def reference_loss(model, batch: dict, is_masked: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """Per row and chunk k: [prompt, clean chunks < k, noisy chunk k] alone, CE / p at its masked tokens; per row
    divided by the response length, then the batch mean."""
    per_row = []
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        ids, chunk_index = batch["input_ids"][row][real], batch["chunk_index"][row][real]
        masked, p = is_masked[row][real], p_mask[row][real]
        total = torch.zeros(())
        for k in range(int(chunk_index.max()) + 1):
            context = chunk_index < k
            in_chunk = chunk_index == k
            noisy_chunk = torch.where(masked[in_chunk], MASK, ids[in_chunk])
            inputs = torch.cat((ids[context], noisy_chunk))[None]
            index = torch.cat((chunk_index[context], chunk_index[in_chunk]))[None]
            logits = model(input_ids=inputs, chunk_index=index).logits[0, -int(in_chunk.sum()):]
            ce = F.cross_entropy(logits, ids[in_chunk], reduction="none")
            total = total + (ce / p[in_chunk])[masked[in_chunk]].sum()
        per_row.append(total / (chunk_index >= 0).sum())
    return torch.stack(per_row).mean()


def test_block_sft_loss_equals_the_per_chunk_reference():
    torch.manual_seed(0)
    model = LLaDAModelLM(make_config(n_layers=2)).eval()
    batch = pad_batch(layout_rows(torch.Generator().manual_seed(0)), EOS, CHUNK)
    result = BlockSFTObjective(MASK)(model, batch, torch.Generator().manual_seed(5))
    _, is_masked, p_mask = clean_context_inputs(batch["labels"].where(batch["labels"] != -100, batch["input_ids"]),
                                                batch["attention_mask"], batch["chunk_index"],
                                                batch["labels"] != -100, MASK, torch.Generator().manual_seed(5))
    assert is_masked.any()
    expected = reference_loss(model, batch, is_masked, p_mask)
    torch.testing.assert_close(result.loss_sum / result.count, expected, rtol=1e-5, atol=1e-6)


def test_each_chunk_has_its_own_mask_rate_and_only_reasoning_is_masked():
    batch = pad_batch(layout_rows(torch.Generator().manual_seed(1)), EOS, CHUNK)
    is_response = batch["labels"] != -100
    inputs, is_masked, p_mask = clean_context_inputs(batch["input_ids"], batch["attention_mask"],
                                                     batch["chunk_index"], is_response, MASK,
                                                     torch.Generator().manual_seed(0))
    assert not (is_masked & ~is_response).any()
    assert ((p_mask >= MASK_EPS) & (p_mask <= 1)).all()
    row, chunks = 2, batch["chunk_index"][2]
    rates = {round(float(p_mask[row][chunks == k][0]), 6) for k in range(int(chunks.max()) + 1)}
    assert len(rates) == int(chunks.max()) + 1  # one draw per chunk
    length = batch["input_ids"].shape[1]
    assert torch.equal(inputs["input_ids"][:, :length], batch["input_ids"])  # the clean copy is the batch
    assert torch.equal(inputs["attention_mask"][:, length:], batch["attention_mask"] * is_response)


def test_full_attention_batches_fill_the_response_with_eos_to_a_random_length():
    rows = layout_rows(torch.Generator().manual_seed(2))
    batch = full_attention_batch(rows, EOS, max_response=40, generator=torch.Generator().manual_seed(0))
    for i, row in enumerate(rows):
        reasoning = [label for label in row["labels"] if label != -100]
        response = batch["input_ids"][i][batch["is_response"][i]].tolist()
        assert len(reasoning) <= len(response) <= 40
        assert response[:len(reasoning)] == reasoning and set(response[len(reasoning):]) <= {EOS}
        assert int(batch["attention_mask"][i].sum()) == int((batch["is_response"][i]).sum()) + sum(
            1 for c, a in zip(row["chunk_index"], row["attention_mask"]) if c == -1 and a == 1)


def test_block_sft_trains_lora_adapters_that_merge_into_a_plain_llada(backbone_dir, tmp_path, capsys):
    """The adaptation stage: `--objective block_sft --use_lora` trains adapters only; peft merges them into a plain
    LLaDA that gives the adapted model's logits (the frozen backbone of a later hybrid)."""
    pytest.importorskip("peft")
    from peft import PeftModel

    from llada_trm.training.arguments import parse_arguments
    from llada_trm.training.trainer import Trainer

    args = ["--model_name_or_path", str(backbone_dir), "--output_dir", str(tmp_path / "run"), "--objective",
            "block_sft", "--use_lora", "--max_steps", "2", "--num_synthetic_train", "16", "--num_synthetic_eval", "4",
            "--batch_size", "4", "--eval_max_samples", "0", "--learning_rate", "0.05", "--max_length", "192"]
    trainer = Trainer(parse_arguments(args, environ={}))
    trainer.train()
    adapted = trainer.accelerator.unwrap_model(trainer.model).eval()
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    adapters, out = tmp_path / "run" / "model", tmp_path / "merged"
    assert merge_main(["--adapters", str(adapters), "--output_dir", str(out), "--backbone", str(backbone_dir)]) == 0
    merged = LLaDAModelLM.from_pretrained(out).eval()  # a plain LLaDA directory, with the run's tokenizer
    assert (out / "manifest.json").exists()
    assert load_tokenizer(out).mask_token_id == load_tokenizer(adapters).mask_token_id
    by_hand = PeftModel.from_pretrained(LLaDAModelLM.from_pretrained(backbone_dir), adapters).merge_and_unload().eval()
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(input_ids=ids).logits, by_hand(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
        base = LLaDAModelLM.from_pretrained(backbone_dir).eval()
        assert not torch.allclose(base(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
    # An existing output is kept unless --overwrite; a directory without adapters is named (one line, exit 2)
    for argv, message in (
        (["--adapters", str(adapters), "--output_dir", str(out)], "exists; pass --overwrite to replace it"),
        (["--adapters", str(backbone_dir), "--output_dir", str(tmp_path / "other")], "no adapter_config.json"),
    ):
        with pytest.raises(SystemExit) as exited:
            merge_main(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err
    assert merge_main(["--adapters", str(adapters), "--output_dir", str(out), "--backbone", str(backbone_dir),
                       "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]  # no staging or old directory left
