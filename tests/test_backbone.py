"""Native LLaDA backbone: official layout, reference numerics, masks, KV cache, bad configs and checkpoints."""

import json
import math

import pytest
import torch
from conftest import make_config
from safetensors.torch import save_file

from llada_trm import CheckpointMismatchError, LLaDAConfig, LLaDAModelLM
from llada_trm.model.configuration_llada import LLaDAConfigError

OFFICIAL_FIELDS = dict(
    d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=40, mlp_ratio=4, vocab_size=50,
    embedding_size=56, max_sequence_length=128, rope=True, rope_theta=500000.0, rope_full_precision=True,
    rms_norm_eps=1e-5, layer_norm_type="rms", activation_type="silu", block_type="llama", include_bias=False,
    include_qkv_bias=False, weight_tying=False, scale_logits=False, alibi=False, model_type="llada",
    eos_token_id=1, pad_token_id=1, mask_token_id=2, architectures=["LLaDAModelLM"],
    # fields of the official file that this implementation reads but need not act on
    attention_dropout=0.0, clip_qkv=None, flash_attention=False, init_device="meta", precision="amp_bf16",
)


def official_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, hd = cfg["d_model"], cfg["d_model"] // cfg["n_heads"]
    kv, hidden, emb = cfg["n_kv_heads"] * hd, cfg["mlp_hidden_size"], cfg["embedding_size"]

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"model.transformer.wte.weight": rnd(emb, d, scale=1.0)}
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        sd.update({
            p + "attn_norm.weight": 1 + rnd(d, scale=0.1), p + "q_proj.weight": rnd(d, d),
            p + "k_proj.weight": rnd(kv, d), p + "v_proj.weight": rnd(kv, d), p + "attn_out.weight": rnd(d, d),
            p + "ff_norm.weight": 1 + rnd(d, scale=0.1), p + "ff_proj.weight": rnd(hidden, d),
            p + "up_proj.weight": rnd(hidden, d), p + "ff_out.weight": rnd(d, hidden),
        })
    sd["model.transformer.ln_f.weight"] = 1 + rnd(d, scale=0.1)
    sd["model.transformer.ff_out.weight"] = rnd(emb, d)
    return sd


def write_official_checkpoint(path, cfg: dict, state_dict: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(state_dict, str(path / "model.safetensors"), metadata={"format": "pt"})


def reference_logits(sd: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """A plain, independent transcription of the LLaDA forward (no masks, no cache)."""
    d, nh, nkv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
    hd, eps, theta = d // nh, cfg["rms_norm_eps"], cfg["rope_theta"]
    T = ids.shape[1]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # x (B, h, T, hd): pair feature j with feature j + hd/2, rotate by angle pos * theta^(-2j/hd)
        half = hd // 2
        ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
        c, s = torch.cos(ang).float(), torch.sin(ang).float()
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    x = sd["model.transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, sd[p + "attn_norm.weight"])
        q = (h @ sd[p + "q_proj.weight"].T).view(1, T, nh, hd).transpose(1, 2)
        k = (h @ sd[p + "k_proj.weight"].T).view(1, T, nkv, hd).transpose(1, 2)
        v = (h @ sd[p + "v_proj.weight"].T).view(1, T, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        heads = []
        for head in range(nh):
            kvh = head // (nh // nkv)
            att = torch.softmax(q[:, head] @ k[:, kvh].transpose(-1, -2) / math.sqrt(hd), dim=-1)
            heads.append(att @ v[:, kvh])
        x = x + torch.cat(heads, dim=-1) @ sd[p + "attn_out.weight"].T
        h = rms(x, sd[p + "ff_norm.weight"])
        gate, up = h @ sd[p + "ff_proj.weight"].T, h @ sd[p + "up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "ff_out.weight"].T
    return rms(x, sd["model.transformer.ln_f.weight"]) @ sd["model.transformer.ff_out.weight"].T


def test_official_layout_loads_and_matches_reference(tmp_path):
    sd = official_state_dict(OFFICIAL_FIELDS)
    write_official_checkpoint(tmp_path / "ckpt", OFFICIAL_FIELDS, sd)
    model = LLaDAModelLM.from_pretrained(tmp_path / "ckpt").eval()
    assert model.config.n_kv_heads == 2 and model.config.embedding_size == 56
    ids = torch.randint(0, 50, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 11, 56)
    torch.testing.assert_close(logits, reference_logits(sd, OFFICIAL_FIELDS, ids), rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["model_type"] == "llada" and written["d_model"] == 32 and written["n_kv_heads"] == 2
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "again" / "model.safetensors"))) == set(sd)


def test_inputs_embeds_equals_input_ids(tiny_backbone):
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        a = tiny_backbone(input_ids=ids).logits
        b = tiny_backbone(inputs_embeds=tiny_backbone.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(a, b)


def test_key_padding_matches_unpadded(tiny_backbone):
    ids = torch.randint(3, 64, (1, 7))
    padded = torch.cat([torch.full((1, 5), 1), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], dim=1).long()
    with torch.no_grad():
        plain = tiny_backbone(input_ids=ids).logits
        out = tiny_backbone(input_ids=padded, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 5:], plain, rtol=1e-5, atol=1e-5)


def block_causal_example():
    # [2 pad][prompt of 4][chunk 0 of 3][chunk 1 of 3][chunk 2 of 3][2 trailing pad]
    chunk_index = torch.tensor([[-1, -1, -1, -1, -1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 2, -1, -1]])
    attention_mask = torch.ones_like(chunk_index)
    attention_mask[:, :2] = 0
    attention_mask[:, -2:] = 0
    ids = torch.randint(3, 64, chunk_index.shape, generator=torch.Generator().manual_seed(3))
    return ids, attention_mask, chunk_index


def test_block_causal_single_layer_equals_bidirectional_prefix():
    # With one layer, block b under the block-causal mask must see exactly what a plain bidirectional pass over
    # the prefix ending with block b sees: an independent reference for the mask itself.
    torch.manual_seed(0)
    model = LLaDAModelLM(make_config(n_layers=1)).eval()
    ids, attention_mask, chunk_index = block_causal_example()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention_mask, chunk_index=chunk_index).logits
        assert torch.isfinite(out).all()  # padding queries attend to themselves, no NaN
        for start, end in [(2, 6), (6, 9), (9, 12), (12, 15)]:
            prefix = model(input_ids=ids[:, :end], attention_mask=attention_mask[:, :end]).logits
            torch.testing.assert_close(out[:, start:end], prefix[:, start:end], rtol=1e-5, atol=1e-5)


def test_later_blocks_never_reach_earlier_ones(tiny_backbone):
    ids, attention_mask, chunk_index = block_causal_example()
    changed = ids.clone()
    changed[:, 9:15] = torch.randint(3, 64, (1, 6))
    with torch.no_grad():
        out = tiny_backbone(input_ids=ids, attention_mask=attention_mask, chunk_index=chunk_index).logits
        out_changed = tiny_backbone(input_ids=changed, attention_mask=attention_mask, chunk_index=chunk_index).logits
        truncated = tiny_backbone(
            input_ids=ids[:, :9], attention_mask=attention_mask[:, :9], chunk_index=chunk_index[:, :9]
        ).logits
    torch.testing.assert_close(out_changed[:, 2:9], out[:, 2:9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(truncated[:, 2:9], out[:, 2:9], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_changed[:, 9:15], out[:, 9:15])


def test_kv_cached_block_decoding_equals_uncached(tiny_backbone):
    ids, attention_mask, chunk_index = block_causal_example()
    ids, attention_mask, chunk_index = ids[:, :15], attention_mask[:, :15], chunk_index[:, :15]
    with torch.no_grad():
        full = tiny_backbone(input_ids=ids, attention_mask=attention_mask, chunk_index=chunk_index).logits
        cache, pieces = None, []
        for start, end in [(0, 6), (6, 9), (9, 12), (12, 15)]:
            out = tiny_backbone(
                input_ids=ids[:, start:end],
                attention_mask=attention_mask[:, start:end],
                chunk_index=chunk_index[:, start:end],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.cache
            pieces.append(out.logits)
    assert cache.length == 15
    torch.testing.assert_close(torch.cat(pieces, dim=1)[:, 2:], full[:, 2:], rtol=1e-5, atol=1e-5)


def test_reading_a_cache_does_not_change_it(tiny_backbone):
    ids, attention_mask, chunk_index = block_causal_example()
    with torch.no_grad():
        cache = tiny_backbone(
            input_ids=ids[:, :6], attention_mask=attention_mask[:, :6], chunk_index=chunk_index[:, :6], use_cache=True
        ).cache
        keys_before = [k.clone() for k in cache.keys]
        out = tiny_backbone(input_ids=ids[:, 6:9], chunk_index=chunk_index[:, 6:9], past_key_values=cache)
    assert out.cache is None and cache.length == 6
    assert all(torch.equal(a, b) for a, b in zip(keys_before, cache.keys))


@pytest.mark.parametrize(
    "field,value,fragment",
    [("block_type", "sequential", "block_type"), ("alibi", True, "alibi"), ("layer_norm_type", "default", "layer_norm_type")],
)
def test_unsupported_config_is_rejected_by_name(field, value, fragment):
    with pytest.raises(Exception, match=fragment):
        make_config(**{field: value})


def test_missing_required_field_is_named(tmp_path):
    cfg = {k: v for k, v in OFFICIAL_FIELDS.items() if k != "n_layers"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLaDAConfigError, match="n_layers"):
        LLaDAConfig.from_pretrained(tmp_path)


def test_missing_and_unexpected_weights_are_an_error(tmp_path):
    sd = official_state_dict(OFFICIAL_FIELDS)
    del sd["model.transformer.blocks.1.up_proj.weight"]
    sd["model.transformer.blocks.1.extra.weight"] = torch.zeros(2)
    write_official_checkpoint(tmp_path, OFFICIAL_FIELDS, sd)
    with pytest.raises(CheckpointMismatchError) as error:
        LLaDAModelLM.from_pretrained(tmp_path)
    assert "blocks.1.up_proj.weight" in str(error.value) and "blocks.1.extra.weight" in str(error.value)
