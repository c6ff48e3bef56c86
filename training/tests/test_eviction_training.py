"""Locret retaining heads, Attention-Gate gates and the PyTorch eviction reference."""

import json
import math
import os

import pytest
import torch

from kvgate_train import evict_ref, gates as gates_mod, locret
from kvgate_train.features import Sequence
from kvgate_train.model import (Capture, LlamaConfig, LlamaForCausalLM, WeightsError,
                                apply_rope, rope_cos_sin)

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=128)


def tiny_model(seed=0, **over):
    m = LlamaForCausalLM(LlamaConfig(**{**TINY, **over}))
    m.init_weights(seed)
    # Larger weights than the init so that attention is far from uniform.
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    return m.eval().requires_grad_(False)


def rand_ids(n, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()


# ------------------------------------------------------------------------------ Locret


def test_cis_labels_equal_brute_force():
    m = tiny_model()
    cfg = m.config
    ids, n_prompt = rand_ids(20), 14
    labels = locret.cis_labels(m, ids, n_prompt)  # [L, n_kv, n_prompt]
    assert labels.shape == (2, 2, n_prompt)
    cap = Capture(qkv=True)
    with torch.no_grad():
        m(torch.tensor([ids]), capture=cap)
    cos, sin = rope_cos_sin(torch.arange(len(ids)), cfg.head_dim, cfg.rope_theta, torch.float32)
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, rec in enumerate(cap.layers):
        q = apply_rope(rec["q"].transpose(1, 2), cos, sin)[0]  # [h, T, d]
        k = apply_rope(rec["k"].transpose(1, 2), cos, sin)[0]  # [n_kv, T, d]
        for j in range(cfg.num_key_value_heads):
            for t in range(n_prompt):
                best = -math.inf
                for head in range(j * g, (j + 1) * g):
                    for p in range(n_prompt, len(ids)):
                        val = float(q[head, p] @ k[j, t]) / math.sqrt(cfg.head_dim)
                        best = max(best, val)
                assert abs(float(labels[layer, j, t]) - best) < 1e-4, (layer, j, t)


def test_top_overlap():
    a = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1, -2, -3, -4] * 2])
    assert float(locret.top_overlap(a, a)) == 1.0
    assert float(locret.top_overlap(a, -a)) == 0.0


def test_a_few_steps_lower_the_locret_loss():
    m = tiny_model()
    torch.manual_seed(0)
    heads = locret.RetainingHeads(m.config, d_r=32)
    data = []
    for s in range(4):
        ids = rand_ids(24, seed=s)
        data.append((ids[:18], locret.cis_labels(m, ids, 18).permute(0, 2, 1)))
    opt = torch.optim.AdamW(heads.parameters(), lr=3e-3)

    def total():
        with torch.no_grad():
            return sum(float(locret.head_loss(locret.predict(m, heads, i), lab, 0.0025))
                       for i, lab in data)
    before = total()
    for _ in range(30):
        for ids, lab in data:
            loss = locret.head_loss(locret.predict(m, heads, ids), lab, 0.0025)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(heads.parameters(), 0.5)
            opt.step()
    assert total() < 0.7 * before


def test_heads_export_reload_and_refusals(tmp_path):
    m = tiny_model()
    heads = locret.RetainingHeads(m.config, d_r=16)
    path = str(tmp_path / "heads.safetensors")
    locret.save_heads(heads, path)
    back = locret.load_heads(path, m.config)
    for k, v in heads.tensors().items():
        assert torch.equal(v, back.tensors()[k])
    # Another model: more layers, or another head shape.
    with pytest.raises(WeightsError, match="3 layers|for 2 layers"):
        locret.load_heads(path, tiny_model(num_hidden_layers=3).config)
    with pytest.raises(WeightsError, match="another model"):
        locret.load_heads(path, tiny_model(num_key_value_heads=4).config)
    # A truncated file and a gates file.
    data = open(path, "rb").read()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        locret.load_heads(str(bad), m.config)
    g = gates_mod.Gates(m.config, heads=2, head_dim=8)
    gpath = str(tmp_path / "gates.safetensors")
    gates_mod.save_gates(g, gpath)
    with pytest.raises(WeightsError, match="expected 'locret'"):
        locret.load_heads(gpath, m.config)
    with pytest.raises(WeightsError, match="expected 'attention-gate'"):
        gates_mod.load_gates(path, m.config)


# ------------------------------------------------------------------------ Attention-Gate


def test_gates_export_reload_and_refusals(tmp_path):
    m = tiny_model()
    g = gates_mod.Gates(m.config, heads=2, head_dim=8, tau=0.4)
    path = str(tmp_path / "g.safetensors")
    gates_mod.save_gates(g, path)
    back = gates_mod.load_gates(path, m.config)
    assert back.tau == pytest.approx(0.4) and back.heads == 2 and back.head_dim == 8
    for k, v in g.tensors().items():
        assert torch.equal(v, back.tensors()[k])
    with pytest.raises(WeightsError, match="another model"):
        gates_mod.load_gates(path, tiny_model(hidden_size=48).config)


def test_hard_gate_mask_hides_flagged_tokens():
    m = tiny_model()
    g = gates_mod.Gates(m.config, heads=2, head_dim=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, 1.0)
    ids = rand_ids(16)
    run = gates_mod.GateRun(g, straight_through=False)
    with torch.no_grad():
        m(torch.tensor([ids]), attn_bias=run)
    flags = run.f
    assert all(float(f[0, 0].min()) == 1.0 for f in flags)  # the first token is kept
    ratio = 1 - float(torch.stack([f.mean() for f in flags]).mean())
    assert 0.1 < ratio < 0.9  # random gates evict some but not all
    # Hiding tokens by a huge negative bias gives the same logits.
    def bias_fn(layer, x, q, k, v):
        f = gates_mod.hard_flags(torch.sigmoid(g.layers[layer](x).float()), g.tau)
        mask = gates_mod.flag_prob_mask(f, m.config.num_attention_heads)
        return torch.where(mask > 0, 0.0, -1e9)
    with torch.no_grad():
        a = m(torch.tensor([ids]), attn_bias=gates_mod.GateRun(g, False))
        b = m(torch.tensor([ids]), attn_bias=bias_fn)
    assert torch.allclose(a, b, atol=1e-5)


def test_a_few_steps_lower_the_gate_losses():
    m = tiny_model()
    torch.manual_seed(0)
    g = gates_mod.Gates(m.config, heads=2, head_dim=8)
    seqs = [Sequence(rand_ids(32, seed=s), 24) for s in range(4)]
    x, y, _ = gates_mod.batch_tensors(seqs, "cpu")
    opt = torch.optim.AdamW(g.parameters(), lr=1e-2)

    def losses():
        run = gates_mod.GateRun(g, straight_through=True)
        s, n = gates_mod.nll(m, x, y, attn_bias=run)
        r = torch.stack([p[:, 1:].mean() for p in run.p])
        return s / n, gates_mod.evict_loss(r, 0.2, "squared")
    with torch.no_grad():
        lm0, ev0 = losses()
    for _ in range(40):
        lm, ev = losses()
        opt.zero_grad()
        (lm + 4 * ev).backward()
        opt.step()
    with torch.no_grad():
        lm1, ev1 = losses()
    assert float(ev1) < 0.5 * float(ev0)
    # The straight-through flags carry gradient to the gate from the LM loss too.
    g.zero_grad()
    lm, _ = losses()
    lm.backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in g.parameters())


@pytest.mark.parametrize("target", [0.5, 0.75])
def test_threshold_mode_meets_the_target_and_the_export_keeps_it(target):
    m = tiny_model()
    torch.manual_seed(1)
    g = gates_mod.Gates(m.config, heads=2, head_dim=8, tau=0.4)
    with torch.no_grad():  # spread the logits (the init starts them all near the bias)
        for layer in g.layers:
            layer.o_proj.weight.mul_(30)
    seqs = [Sequence(rand_ids(48, seed=s), 40) for s in range(6)]
    x, y, _ = gates_mod.batch_tensors(seqs, "cpu")
    run = gates_mod.GateRun(g, straight_through=True, evict=target)
    s, n = gates_mod.nll(m, x, y, attn_bias=run)
    for f in run.f:  # every layer keeps 1 - target of the tokens after the first
        assert abs(float(f.detach()[:, 1:].mean()) - (1 - target)) < 0.02
    (s / n).backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in g.parameters())
    # Folded into the weights, the gate alone flags the same tokens, p on the same scale.
    flags = [f.detach().clone() for f in run.f]
    probs = [p.detach().clone() for p in run.p]
    gates_mod.fold_threshold(g, run.thr, run.scale)
    plain = gates_mod.GateRun(g, straight_through=False)
    gates_mod.nll(m, x, y, attn_bias=plain)
    for a, b, p, q in zip(flags, plain.f, probs, plain.p):
        # Only a token lying on the threshold itself may land on the other side in float32.
        assert int((a.round() != b).sum()) <= 2
        assert torch.allclose(p, q, atol=1e-3)


def test_budget_mask_is_what_a_budgeted_chunked_cache_holds():
    torch.manual_seed(3)
    B, T, n_kv, heads, budget, chunk = 2, 23, 2, 4, 3, 5
    p = torch.rand(B, T, n_kv, requires_grad=True)
    f = (torch.rand(B, T, n_kv) > 0.2).float()
    m = gates_mod.budget_prob_mask(p, f, budget, chunk, heads)
    assert m.shape == (B, heads, T, T)
    for b in range(B):
        for k in range(n_kv):
            for i in range(T):
                start = i // chunk * chunk
                # The cache after compressing at `start`: the first token, then the flagged
                # earlier tokens of highest p, `budget` in all.
                earlier = [j for j in range(1, start) if f[b, j, k] > 0]
                earlier.sort(key=lambda j: (-float(p[b, j, k]), -j))
                held = ({0} | set(earlier[:budget - 1])) if start > 0 else set()
                own = {j for j in range(start, i + 1) if f[b, j, k] > 0 or j == 0}
                want = held | own | {i}
                for h in range(k * heads // n_kv, (k + 1) * heads // n_kv):
                    got = {j for j in range(i + 1) if float(m[b, h, i, j].detach()) > 0.5}
                    assert got == want, (b, k, i, got, want)
    # Straight-through: the LM loss reaches the scores of evicted keys too.
    (m * torch.rand_like(m)).sum().backward()
    assert float(p.grad.abs().min()) > 0


def test_lora_merge_keeps_the_function():
    m = tiny_model()
    params = gates_mod.add_lora(m, rank=2, alpha=4.0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    x = torch.tensor([rand_ids(12)])
    with torch.no_grad():
        a = m(x)
        gates_mod.merge_lora(m)
        b = m(x)
    assert torch.allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------------------- reference


@pytest.mark.parametrize("position", ["reassign", "original"])
def test_locret_reference_with_a_large_budget_equals_the_model(position):
    m = tiny_model()
    heads = locret.RetainingHeads(m.config, d_r=16)
    ids = rand_ids(40)
    ref = evict_ref.EvictionReference(
        m, evict_ref.Params("locret", budget=64, chunk=7, stabilizers=4, n_loc=5,
                            position=position), heads=heads)
    ref.prefill(ids)
    with torch.no_grad():
        want = m(torch.tensor([ids]))[0]
    got = torch.stack(ref.trace.logits)
    assert torch.allclose(got, want, atol=1e-4)
    assert ref.retained() == [[list(range(40))] * 2] * 2


def test_locret_reference_evicts_by_stored_score():
    m = tiny_model()
    torch.manual_seed(3)
    heads = locret.RetainingHeads(m.config, d_r=16)
    ids = rand_ids(50)
    p = evict_ref.Params("locret", budget=12, chunk=8, stabilizers=4, n_loc=6)
    ref = evict_ref.EvictionReference(m, p, heads=heads)
    ref.prefill(ids)
    scores = ref.trace.scores
    # Replay the selection rule with the stored scores.
    for layer in range(2):
        for j in range(2):
            kept = []
            for s in range(0, 44, 8):
                e = min(s + 8, 44)
                kept += list(range(s, e))
                if len(kept) > 12:
                    protect = set(kept[-4:]) if e < 44 else set()
                    key = lambda t: (-(math.inf if t in protect else scores[layer][j][t]), -t)
                    kept = sorted(sorted(kept, key=key)[:12])
            kept += list(range(44, 50))
            assert ref.retained()[layer][j] == kept
    # Heads choose differently (per-head selection).
    assert ref.retained()[0][0] != ref.retained()[0][1] or ref.retained()[1][0] != \
        ref.retained()[1][1]


def test_gate_reference_chunked_equals_the_masked_model():
    m = tiny_model()
    g = gates_mod.Gates(m.config, heads=2, head_dim=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, 1.0)
    ids = rand_ids(30)
    with torch.no_grad():
        run = gates_mod.GateRun(g, straight_through=False)
        want = m(torch.tensor([ids]), attn_bias=run)[0]
    ref = evict_ref.EvictionReference(m, evict_ref.Params("attention-gate", budget=0, chunk=7),
                                      gates=g)
    ref.prefill(ids)
    assert torch.allclose(torch.stack(ref.trace.logits), want, atol=1e-4)
    for layer in range(2):
        flags = run.f[layer][0].T.int().tolist()  # [n_kv][T]
        assert ref.trace.flags[layer] == flags
        assert ref.retained()[layer] == [[t for t in range(30) if f[t]] for f in flags]


def test_reference_command_dumps_json(tmp_path):
    m = tiny_model()
    mdir = tmp_path / "model"
    m.save_pretrained(str(mdir))
    heads = locret.RetainingHeads(m.config, d_r=16)
    hpath = str(tmp_path / "h.safetensors")
    locret.save_heads(heads, hpath)
    out = tmp_path / "ref.json"
    rc = evict_ref.main(["--model", str(mdir), "--policy", "locret", "--weights", hpath,
                         "--ids", ",".join(map(str, rand_ids(30))), "--budget", "10", "--chunk",
                         "8", "--stabilizers", "3", "--decode", "20", "--slack", "4",
                         "--out", str(out)])
    assert rc == 0
    d = json.load(open(out))
    assert len(d["generated"]) == 20 and len(d["logits"]) == 50
    for layer in d["retained"]:
        for h in layer:
            assert len(h) <= 10 + 4 and h == sorted(h)
    for layer in d["retained_after_prefill"]:
        assert all(len(h) == 10 for h in layer)
    # Mismatched weights: a clear error, exit 1.
    other = tiny_model(num_hidden_layers=3)
    hp2 = str(tmp_path / "h3.safetensors")
    locret.save_heads(locret.RetainingHeads(other.config, d_r=16), hp2)
    assert evict_ref.main(["--model", str(mdir), "--policy", "locret", "--weights", hp2,
                           "--ids", "1,2,3", "--budget", "10"]) == 1
