"""Code paths that meet tensors on an accelerator: they run on every device this machine has (CPU always)."""

import pytest
import torch
from test_hybrid import make_batch, make_hybrid

from llada_trm.debug_view import format_chunk_inspection

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_debug_view_works_on_the_batch_device(device, shipped_tokenizer):
    model = make_hybrid(chunk_size=4, steps=2).to(device)
    batch = {k: v.to(device) for k, v in make_batch([5, 3], [3, 2], 4, masked=[[1], [0]]).items()}
    with torch.no_grad():
        output = model(**batch)
    text = format_chunk_inspection(shipped_tokenizer, batch, output)
    assert "Masked 4/" in text and "Masked chunks: [1]" in text
    assert "Chunk 1/3: loss=" in text and ", weight=1.30" in text and ", weight=1.00" in text
