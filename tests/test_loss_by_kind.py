"""Where the loss is: `layout.token_kinds` names each reasoning token's role, and `inspect --loss_by_kind` sums the
head's and the backbone's CE at the masked positions by kind."""

import re

from llada_trm.data.layout import token_kinds
from llada_trm.inspect import main as inspect_main


def test_token_kinds_of_a_step_and_an_answer():
    pieces = ["Kai", " gives", " ", "6", ":", " ", "2", "2", " -", " ", "6", " =", " ", "1", "6", ".", "\n",
              "<answer>", "1", "6", "</answer>", " 12", " =", " 345"]
    assert token_kinds(pieces) == (
        ["text"] * 3 + ["number", "text", "text", "number", "number", "text", "text", "number", "text", "text",
                        "result", "result", "text", "text", "text", "answer", "answer", "text", "number", "text",
                        "result"])


def test_a_fresh_head_loses_what_its_backbone_loses_on_every_kind(capsys):
    # every chunk masked: each reasoning token is a masked position, so the kinds cover them all
    assert inspect_main(["--backbone", "tiny-llada", "--loss_by_kind", "--num_samples", "6",
                         "--mask_probability", "1"]) == 0
    row = r"^\| (\w+) +\| +(\d+) \| +([\d.]+) \| +([\d.]+) \| +([-+][\d.]+) \|"
    rows = re.findall(row, capsys.readouterr().out, re.M)
    kinds = {kind: (int(count), float(head), float(backbone), float(gap)) for kind, count, head, backbone, gap in rows}
    assert set(kinds) == {"result", "answer", "number", "text"}
    assert all(count > 0 for count, *_ in kinds.values())
    for count, head, backbone, gap in kinds.values():  # out_proj starts at zero: the hybrid is its backbone
        assert head == backbone and gap == 0.0
    assert kinds["result"][2] > kinds["number"][2]  # computing a result is harder than copying a quantity
