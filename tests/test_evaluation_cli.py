"""Exact-match evaluation on a model whose answer is known, and the generate / evaluate command lines."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_config, shipped_vocab_size

from llada_trm import LLaDAModelLM
from llada_trm.data.dataset import layout_sample
from llada_trm.data.layout import render_prompt
from llada_trm.inference.exact_match import (
    chunk_decoder_accuracy,
    default_new_token_budget,
    fair_evaluation,
    llada_sampler_accuracy,
    prompt_ids_of,
    scored_rows,
)
from llada_trm.inference.sampler import generate
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.hybrid import LLaDATRMHybrid

CHUNK = 4
QUESTIONS = ["Mia has 3 apples.", "Leo finds 4 coins.", "Ava has 2 books and buys 5 more."]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


# Every question a test below decodes: the fixture trains on these and checks its margin on them.
DECODED_QUESTIONS = QUESTIONS + ["Zoe has 9 shells.", "Ava has 2 books."]
SAMPLER_LENGTHS = (8, 12, 16, 20, 24)  # new-token budgets the sampler is run with below (multiples of CHUNK)
MARGIN = 3.0  # logit gap to the runner-up at every masked position: far beyond float rounding across machines
MAX_TRAIN_STEPS = 1500


def prompt_ids(tokenizer, question: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer(render_prompt(question), add_special_tokens=False)["input_ids"]]


def prepared_row(tokenizer, question: str, reasoning_ids: list[int], answer: str) -> dict:
    row = layout_sample(prompt_ids(tokenizer, question), reasoning_ids, chunk_size=CHUNK, max_length=128,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return dict(row, answer=answer)


def right_padded(rows: list[dict], name: str, fill: int) -> torch.Tensor:
    width = max(len(r[name]) for r in rows)
    return torch.tensor([r[name] + [fill] * (width - len(r[name])) for r in rows])


def decoder_states(tokenizer, target: list[int]) -> tuple[dict, dict]:
    """(block-causal batch, bidirectional batch): every state the two decoders visit on DECODED_QUESTIONS.

    Block-causal (the chunk decoder): the answer chunk with any subset of it masked. Bidirectional (LLaDA's
    sampler, blocks of CHUNK, each budget of SAMPLER_LENGTHS): the first block with any subset masked and the
    rest masked, then the first block committed with the rest masked or half committed. `labels` is the answer
    at masked positions and -100 elsewhere, so a margin over it is a margin over every prediction the decoders
    commit, whichever order confidences pick.
    """
    mask_id, eos = tokenizer.mask_token_id, tokenizer.eos_token_id
    subsets = [[p for p in range(CHUNK) if bits >> p & 1] for bits in range(1, 2 ** CHUNK)]

    def state(prompt: list[int], answer: list[int], masked: set[int], **extra) -> dict:
        return dict(input_ids=prompt + [mask_id if i in masked else t for i, t in enumerate(answer)],
                    labels=[-100] * len(prompt) + [t if i in masked else -100 for i, t in enumerate(answer)],
                    attention_mask=[1] * (len(prompt) + len(answer)), **extra)

    block_causal, bidirectional = [], []
    for question in DECODED_QUESTIONS:
        row = prepared_row(tokenizer, question, target, "7")
        prompt_length = row["chunk_index"].index(0)
        prompt, answer = row["input_ids"][:prompt_length], row["input_ids"][prompt_length:]
        for subset in subsets:
            block_causal.append(dict(state(prompt, answer, set(subset)),
                                     attention_mask=row["attention_mask"], chunk_index=row["chunk_index"]))
        prompt = prompt_ids(tokenizer, question)
        for length in SAMPLER_LENGTHS:
            answer = target + [eos] * (length - len(target))
            rest = set(range(CHUNK, length))
            bidirectional += [state(prompt, answer, set(subset) | rest) for subset in subsets]
            bidirectional.append(state(prompt, answer, set(range(CHUNK + (length - CHUNK) // 2, length))))
    batch = lambda rows, **fills: {name: right_padded(rows, name, fill) for name, fill in fills.items()}  # noqa: E731
    return (batch(block_causal, input_ids=eos, labels=-100, attention_mask=0, chunk_index=-1),
            batch(bidirectional, input_ids=eos, labels=-100, attention_mask=0))


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Smallest (label logit - best other logit) over the supervised positions."""
    supervised = labels != -100
    logits, labels = logits[supervised], labels[supervised]
    right = logits.gather(1, labels[:, None]).squeeze(1)
    return (right - logits.scatter(1, labels[:, None], -torch.inf).amax(dim=1)).min()


@pytest.fixture(scope="module")
def answering_model(shipped_tokenizer) -> LLaDATRMHybrid:
    """A tiny backbone trained to reason `<answer>7</answer>` in one chunk after any question below, by a logit
    margin of MARGIN in every state either decoder visits; the head is fresh (zero out_proj), so hybrid and
    backbone answer the same. The margin, not the exact weights, is what makes the answers hold on any machine."""
    torch.manual_seed(0)
    vocab = shipped_vocab_size(shipped_tokenizer)
    backbone = LLaDAModelLM(make_config(vocab_size=vocab, embedding_size=vocab, max_sequence_length=128))
    target = shipped_tokenizer("<answer>7</answer>", add_special_tokens=False)["input_ids"]
    block_causal, bidirectional = decoder_states(shipped_tokenizer, target)
    optimizer = torch.optim.Adam(backbone.parameters(), lr=1e-2)
    margin = -torch.inf
    for step in range(MAX_TRAIN_STEPS):
        causal_logits = backbone(**{k: v for k, v in block_causal.items() if k != "labels"}).logits
        full_logits = backbone(input_ids=bidirectional["input_ids"],
                               attention_mask=bidirectional["attention_mask"]).logits
        margin = min(logit_margin(causal_logits, block_causal["labels"]),
                     logit_margin(full_logits, bidirectional["labels"])).item()
        if margin >= MARGIN:
            break
        loss = (torch.nn.functional.cross_entropy(causal_logits.flatten(0, 1), block_causal["labels"].flatten())
                + torch.nn.functional.cross_entropy(full_logits.flatten(0, 1), bidirectional["labels"].flatten()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert margin >= MARGIN, f"training reached a logit margin of {margin:.2f} in {MAX_TRAIN_STEPS} steps, " \
                             f"below the {MARGIN} the answers need"
    config = HybridConfig(chunk_size=CHUNK, max_recursive_steps=2, min_recursive_steps=1, head_hidden_size=16,
                          head_heads=2)
    model = LLaDATRMHybrid(config, backbone=backbone.eval()).eval()
    out = model.generate_with_refinement(DECODED_QUESTIONS, tokenizer=shipped_tokenizer, max_length=100)
    assert out.texts == ["<answer>7</answer>"] * len(DECODED_QUESTIONS), "the trained model should answer 7"
    rows = [prompt_ids(shipped_tokenizer, q) for q in QUESTIONS]
    width = max(map(len, rows))
    ids = torch.tensor([[1] * (width - len(r)) + r for r in rows])
    sampled = generate(backbone, ids, (ids != 1).long(), steps=4 * CHUNK, gen_length=4 * CHUNK, block_length=CHUNK)
    sampled_texts = [shipped_tokenizer.decode(row[width:width + 3]) for row in sampled.tolist()]
    assert sampled_texts == ["<answer>7</answer>"] * 3, f"LLaDA's sampler should answer 7 as well: {sampled_texts}"
    return model


@pytest.fixture(scope="module")
def checkpoint_dirs(answering_model, shipped_tokenizer, tmp_path_factory):
    """(hybrid checkpoint, backbone directory), each with the tokenizer files."""
    root = tmp_path_factory.mktemp("checkpoints")
    answering_model.backbone.save_pretrained(root / "backbone")
    shipped_tokenizer.save_pretrained(root / "backbone")
    answering_model.config.backbone_name_or_path = str(root / "backbone")
    answering_model.save_pretrained(root / "hybrid")
    shipped_tokenizer.save_pretrained(root / "hybrid")
    return root / "hybrid", root / "backbone"


def rows_with_answers(tokenizer, answers: list[str]) -> list[dict]:
    reasoning = tokenizer("3 + 4 = 7.", add_special_tokens=False)["input_ids"]
    return [prepared_row(tokenizer, QUESTIONS[i % 3], reasoning, a) for i, a in enumerate(answers)]


def test_prompt_ids_are_the_real_prompt_region(shipped_tokenizer):
    rows = rows_with_answers(shipped_tokenizer, ["7"] * 3)
    assert any(row["attention_mask"][0] == 0 for row in rows)  # some prompts are left-padded to a chunk boundary
    assert [prompt_ids_of(row) for row in rows] == [prompt_ids(shipped_tokenizer, q) for q in QUESTIONS]


@pytest.mark.parametrize("refine", [True, False])
def test_chunk_decoder_accuracy_scores_exact_matches(answering_model, shipped_tokenizer, refine):
    def score(answers):
        return chunk_decoder_accuracy(answering_model, shipped_tokenizer, rows_with_answers(shipped_tokenizer, answers),
                                      max_new_tokens=12, enable_refinement=refine, batch_size=2, progress=False)

    right = score(["7", " 7 ", "7"])
    assert right["accuracy"] == 1.0 and right["correct"] == 3 and right["num_samples"] == 3
    assert right["new_tokens"] == 3 * 3 and right["tokens_per_second"] > 0
    assert 1 <= right["mean_refinement_steps"] <= 2 if refine else right["mean_refinement_steps"] == 0.0
    assert score(["8", "70", "seven"])["accuracy"] == 0.0


def test_llada_sampler_accuracy_scores_exact_matches(answering_model, shipped_tokenizer):
    def score(answers, batch_size=2):
        return llada_sampler_accuracy(answering_model.backbone, shipped_tokenizer,
                                      rows_with_answers(shipped_tokenizer, answers), max_new_tokens=4 * CHUNK,
                                      block_length=CHUNK, batch_size=batch_size, progress=False)

    right = score(["7", "7", " 7"])
    assert (right["accuracy"], right["correct"], right["num_samples"]) == (1.0, 3, 3)
    assert right["new_tokens"] == 3 * 3  # up to and including </answer>, as the chunk decoder counts
    assert right["mean_refinement_steps"] == 0.0 and right["tokens_per_second"] > 0
    assert score(["7", "8", "9", "7"], batch_size=3)["accuracy"] == 0.5


def test_scored_rows_and_the_default_budget(shipped_tokenizer):
    rows = rows_with_answers(shipped_tokenizer, ["7", "", "8", "7"])
    scored, unscored = scored_rows(rows, max_samples=3)
    assert [r["answer"] for r in scored] == ["7", "8"] and unscored == 1
    reasoning = sum(label != -100 for label in rows[0]["labels"])  # reasoning + EOS, whole chunks
    assert reasoning % CHUNK == 0 and default_new_token_budget(rows, CHUNK) == reasoning + CHUNK


def test_fair_evaluation_scores_every_decoder_on_the_same_rows(answering_model, shipped_tokenizer):
    rows = rows_with_answers(shipped_tokenizer, ["7", "8", "7"])
    models = {"hybrid_refined": answering_model, "backbone_llada_sampler": answering_model.backbone,
              "backbone_chunked": answering_model}
    result = fair_evaluation(shipped_tokenizer, rows, 12, CHUNK, models, progress=False)
    assert result["num_samples"] == 3 and result["max_new_tokens"] == 12
    assert result["accuracy"] == {"backbone_llada_sampler": 2 / 3, "backbone_chunked": 2 / 3, "hybrid_refined": 2 / 3}
    assert all(r["num_samples"] == 3 for r in result["decoders"].values())
    assert list(result["accuracy"]) == ["backbone_llada_sampler", "backbone_chunked", "hybrid_refined"]
    only_backbone = fair_evaluation(shipped_tokenizer, rows, 12, CHUNK,
                                    {"backbone_llada_sampler": answering_model.backbone}, progress=False)
    assert list(only_backbone["accuracy"]) == ["backbone_llada_sampler"]
    with pytest.raises(ValueError, match="unknown decoder"):
        fair_evaluation(shipped_tokenizer, rows, 12, CHUNK, {"beam": answering_model}, progress=False)


def run_module(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, input=stdin,
                          timeout=300)


def test_generate_cli_prints_the_answer(checkpoint_dirs):
    checkpoint, _ = checkpoint_dirs
    result = run_module("llada_trm.generate", "--checkpoint", str(checkpoint), "--prompt", "Mia has 3 apples.",
                        "--max_length", "100")
    assert result.returncode == 0, result.stderr
    assert "Answer: 7" in result.stdout.splitlines()


def test_generate_cli_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_module("llada_trm.generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr


def test_generate_cli_rejects_a_directory_that_is_not_a_checkpoint(tmp_path, checkpoint_dirs, capsys):
    from llada_trm.generate import main

    _, backbone = checkpoint_dirs
    assert main(["--checkpoint", str(tmp_path), "--prompt", "hi"]) == 2
    assert main(["--checkpoint", str(backbone), "--prompt", "hi"]) == 2  # a plain LLaDA model
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "config.json" in errors[0] and "not a hybrid checkpoint" in errors[1]


def test_generate_cli_modes(checkpoint_dirs, capsys, monkeypatch):
    from llada_trm.generate import main

    checkpoint, backbone = checkpoint_dirs
    assert main(["--checkpoint", str(checkpoint), "--prompt", "Leo finds 4 coins.", "--trace", "--no_refinement",
                 "--max_length", "100"]) == 0
    out = capsys.readouterr().out
    assert "Answer: 7" in out and "chunk 0: 0 steps" in out
    assert main(["--backbone", str(backbone), "--prompt", "Leo finds 4 coins.", "--temperature", "0.5",
                 "--seed", "3", "--max_length", "100"]) == 0
    assert "Answer: " in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("Mia has 3 apples.\nAva has 2 books.\n\nnever read\n"))
    assert main(["--checkpoint", str(checkpoint), "--chat", "--max_length", "100"]) == 0
    assert capsys.readouterr().out.count("Answer: 7") == 2


def test_evaluate_cli_reports_every_decoder(checkpoint_dirs, tmp_path, capsys):
    from llada_trm.evaluate import main

    checkpoint, _ = checkpoint_dirs
    records = [{"question": q, "reasoning": ["3 + 4 = 7."], "answer": a} for q, a in zip(QUESTIONS, ["7", "7", "8"])]
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    out_json = tmp_path / "results.json"
    assert main(["--checkpoint", str(checkpoint), "--dataset_path", str(data), "--split", "train",
                 "--max_length", "100", "--no_progress", "--output_json", str(out_json)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| ")]
    assert rows[0][:5] == ["decoder", "exact match", "s.e.", "correct", "samples"]
    table = {row[0]: row[1:] for row in rows[1:]}
    for decoder in ("backbone_llada_sampler", "backbone_chunked", "hybrid_refined"):
        assert table[decoder][:4] == ["0.667", f"{(2 / 3 * (1 / 3) / 3) ** 0.5:.3f}", "2", "3"], decoder
    saved = json.loads(out_json.read_text())
    assert saved["num_samples"] == 3 and saved["accuracy"]["hybrid_refined"] == 2 / 3
    assert main(["--checkpoint", str(checkpoint), "--dataset_name", "synthetic", "--split", "test",
                 "--max_samples", "2", "--max_length", "100", "--no_progress"]) == 0
    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
