import json
import os

import pytest
import torch

from conftest import SHARED_MODELS
from kvgate_train.model import (Capture, LlamaConfig, LlamaForCausalLM, WeightsError,
                                load_config)

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=64)


def tiny_model(tied=True, seed=0):
    m = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tied, **TINY))
    m.init_weights(seed)
    return m


def stories_dir():
    d = os.path.join(SHARED_MODELS, "stories260K")
    if not os.path.isdir(d):
        pytest.fail(f"{os.path.abspath(d)} is missing: the stories260K golden test needs "
                    "../shared/models beside the repository")
    return d


def test_stories260k_golden_greedy():
    d = stories_dir()
    golden = json.load(open(os.path.join(d, "golden_greedy.json")))
    model = LlamaForCausalLM.from_pretrained(d).eval()
    prompt = golden["prompt_token_ids"]
    want = golden["greedy_token_ids"][len(prompt):]
    got = model.generate_greedy(prompt, len(want), stop_ids=(1,))
    assert got == want
    # The full-sequence forward (fused attention) agrees with the cached decode and the logits.
    with torch.no_grad():
        logits = model(torch.tensor([golden["greedy_token_ids"]]))[0]
    assert logits[:-1].argmax(-1).tolist() == golden["greedy_token_ids"][1:]
    for pos_key, pos in (("logits_pos0_top5", 0), ("logits_pos10_top5", 10)):
        for tid, val in golden[pos_key]:
            assert abs(float(logits[pos, tid]) - val) < 1e-3


@pytest.mark.parametrize("tied", [True, False])
def test_export_then_reload_gives_identical_tensors(tmp_path, tied):
    m = tiny_model(tied)
    m.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is tied
    r = LlamaForCausalLM.from_pretrained(str(tmp_path))
    a, b = m.hf_state_dict(), r.hf_state_dict()
    assert set(a) == set(b)
    assert ("lm_head.weight" in a) is (not tied)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randint(0, TINY["vocab_size"], (1, 10))
    with torch.no_grad():
        assert torch.equal(m(x), r(x))


def test_truncated_weights_file_is_refused(tmp_path):
    tiny_model().save_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors.*(truncated or corrupt)"):
        LlamaForCausalLM.from_pretrained(str(tmp_path))
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        LlamaForCausalLM.from_pretrained(str(tmp_path))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    tiny_model().save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "config.json"
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = 64
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(WeightsError, match=r"mlp\.gate_proj\.weight has shape \[48, 32\], but "
                       r"the config needs \[64, 32\]"):
        LlamaForCausalLM.from_pretrained(str(tmp_path))
    cfg["intermediate_size"] = 48
    cfg["num_hidden_layers"] = 3
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(WeightsError, match="missing .* tensor"):
        LlamaForCausalLM.from_pretrained(str(tmp_path))
    cfg["num_hidden_layers"] = 1
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(WeightsError, match="does not have"):
        LlamaForCausalLM.from_pretrained(str(tmp_path))
    cfg["num_hidden_layers"] = 2
    cfg["tie_word_embeddings"] = False
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(WeightsError, match="lm_head.weight"):
        LlamaForCausalLM.from_pretrained(str(tmp_path))


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="config.json: not found"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="malformed JSON"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(WeightsError, match="not a Llama checkpoint"):
        load_config(str(tmp_path))


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    m = tiny_model()
    x = torch.randint(0, TINY["vocab_size"], (4, 32))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = m.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5


def test_capture_returns_qkv_and_logits_and_matches_fused_path():
    m = tiny_model().eval()
    x = torch.randint(0, TINY["vocab_size"], (2, 12))
    cap = Capture(qkv=True, logits=True, normed_input=True)
    with torch.no_grad():
        fused = m(x)
        eager = m(x, capture=cap)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    assert len(cap.layers) == TINY["num_hidden_layers"]
    rec = cap.layers[0]
    assert rec["q"].shape == (2, 12, 4, 8) and rec["k"].shape == (2, 12, 2, 8)
    assert rec["v"].shape == (2, 12, 2, 8) and rec["normed_input"].shape == (2, 12, 32)
    assert rec["logits"].shape == (2, 4, 12, 12)
    assert torch.isinf(rec["logits"][0, 0, 0, 1])  # causal
    # Pre-RoPE k really is k_proj of the normed input.
    k = m.model.layers[0].self_attn.k_proj(rec["normed_input"]).view(2, 12, 2, 8)
    torch.testing.assert_close(k, rec["k"])


def test_attn_bias_hides_a_token():
    """A -inf bias on key 3 for every head equals the logits computed with that key removed
    from attention (what an Attention-Gate mask does)."""
    m = tiny_model().eval()
    x = torch.randint(0, TINY["vocab_size"], (1, 8))

    def bias(layer, h, q, k, v):
        b = torch.zeros(1, 1, 8, 8)
        b[..., 4:, 3] = float("-inf")
        return b
    cap = Capture(logits=True)
    with torch.no_grad():
        m(x, capture=cap, attn_bias=bias)
    p = torch.softmax(cap.layers[1]["logits"], -1)
    assert torch.all(p[..., 4:, 3] == 0) and torch.all(p[..., 3, 3] > 0)


def test_kv_cache_decode_equals_full_forward():
    m = tiny_model(tied=False).eval()
    x = torch.randint(0, TINY["vocab_size"], (1, 20))
    from kvgate_train.model import KVCache
    with torch.no_grad():
        full = m(x)
        cache = KVCache(TINY["num_hidden_layers"])
        parts = [m(x[:, :13], cache=cache)] + [m(x[:, i:i + 1], cache=cache)
                                               for i in range(13, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_matches_transformers_reference(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: "
                                       "the independent reference check is skipped")
    m = tiny_model(tied=False, seed=3)
    m.save_pretrained(str(tmp_path))
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, TINY["vocab_size"], (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x).logits.float(), rtol=1e-4, atol=1e-4)
