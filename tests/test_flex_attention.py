"""FlexAttention block masks give what the SDPA boolean mask gives, wherever FlexAttention runs."""

import pytest
import torch
from conftest import make_config
from support import make_batch

from llada_trm import LLaDAModelLM
from llada_trm.model import flex_attention as flex
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.modeling_llada import attention_context

pytestmark = pytest.mark.skipif(not flex.flex_available(), reason="this torch build has no FlexAttention")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CLOSE = dict(rtol=1e-5, atol=2e-5)


@pytest.fixture
def backend():
    """Switch the attention backend inside a test; the previous one comes back afterwards."""
    before = flex.attention_backend()
    yield flex.set_attention_backend
    flex.set_attention_backend(before)


def padded_block_causal_batch():
    return make_batch([5, 3, 9], [3, 2, 1], 4, masked=[[1], [0], [0]])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_backbone_logits_equal_sdpa(backend, kv_heads):
    torch.manual_seed(0)
    model = LLaDAModelLM(make_config(n_kv_heads=kv_heads)).eval()
    batch = padded_block_causal_batch()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], chunk_index=batch["chunk_index"])
    outputs = {}
    for name in ("sdpa", "flex"):
        backend(name)
        with torch.no_grad():
            outputs[name] = model(**inputs).logits
    assert flex.is_block_mask(attention_context(3, 20, 8, 1e4, device=torch.device("cpu"),
                                                chunk_index=batch["chunk_index"]).allowed)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs["flex"][real], outputs["sdpa"][real], **CLOSE)


def test_cached_chunk_equals_sdpa(backend):
    """Queries after a KV cache: the own-position rule is shifted by the cache length."""
    torch.manual_seed(0)
    model = LLaDAModelLM(make_config()).eval()
    batch = padded_block_causal_batch()
    split = 12
    outputs = {}
    for name in ("sdpa", "flex"):
        backend(name)
        with torch.no_grad():
            first = model(input_ids=batch["input_ids"][:, :split], attention_mask=batch["attention_mask"][:, :split],
                          chunk_index=batch["chunk_index"][:, :split], use_cache=True)
            outputs[name] = model(input_ids=batch["input_ids"][:, split:], attention_mask=batch["attention_mask"][:, split:],
                                  chunk_index=batch["chunk_index"][:, split:], past_key_values=first.cache).logits
    real = batch["attention_mask"][:, split:].bool()
    torch.testing.assert_close(outputs["flex"][real], outputs["sdpa"][real], **CLOSE)


@pytest.mark.parametrize("device", DEVICES)
def test_hybrid_loss_and_head_gradients_equal_sdpa(backend, device):
    """On CPU, which has no FlexAttention backward, the head's training pass takes the dense fallback."""
    batch = {k: v.to(device) for k, v in padded_block_causal_batch().items()}
    results = {}
    for name in ("sdpa", "flex"):
        backend(name)
        torch.manual_seed(0)  # heads of 16 dimensions in backbone and head, which the CUDA kernels take
        config = HybridConfig(chunk_size=4, max_recursive_steps=2, min_recursive_steps=1, head_hidden_size=32,
                              head_heads=2)
        model = LLaDATRMHybrid(config, backbone=LLaDAModelLM(make_config(d_model=64))).to(device).train()
        torch.nn.init.normal_(model.head.out_proj.weight, std=0.3)
        loss = model(**batch).loss
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad for n, p in model.head.named_parameters() if p.grad is not None})
    close = CLOSE if device == "cpu" else dict(rtol=1e-4, atol=1e-4)  # different fp32 kernels on CUDA
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], **close)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["flex"][1][name], grad, **close, msg=name)


def test_auto_uses_flex_only_for_uncached_cuda_passes_with_kernel_friendly_heads(backend):
    backend("auto")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not flex.use_flex(cpu, past_length=0, head_dim=64)
    assert flex.use_flex(cuda, past_length=0, head_dim=64) and flex.use_flex(cuda, past_length=0, head_dim=128)
    assert not flex.use_flex(cuda, past_length=32, head_dim=64)  # cached decoding stays on SDPA
    assert not flex.use_flex(cuda, past_length=0, head_dim=8) and not flex.use_flex(cuda, past_length=0, head_dim=48)
    backend("sdpa")
    assert not flex.use_flex(cuda, past_length=0, head_dim=64)
    with pytest.raises(ValueError, match="attention backend"):
        flex.set_attention_backend("flash")


@pytest.mark.parametrize("device", DEVICES)
def test_default_backend_on_each_device_equals_sdpa(backend, device):
    """On CUDA the default runs compiled FlexAttention (head size 16 here); on CPU it is SDPA itself."""
    torch.manual_seed(0)
    model = LLaDAModelLM(make_config(d_model=64)).to(device).eval()
    batch = {k: v.to(device) for k, v in padded_block_causal_batch().items()}
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], chunk_index=batch["chunk_index"])
    outputs = {}
    for name in ("sdpa", "auto"):
        backend(name)
        with torch.no_grad():
            outputs[name] = model(**inputs).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs["auto"][real], outputs["sdpa"][real], rtol=1e-4, atol=1e-4)
