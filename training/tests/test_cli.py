"""The commands end to end on a tiny model: train a few steps, export, resume, evaluate."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TRAINING_DIR
from kvgate_train import eval_retrieval, gates, locret, train_lm
from kvgate_train.model import LlamaForCausalLM

TINY_ARGS = ["--preset", "tiny", "--curriculum", "256:0.5,320:0.5", "--batch-tokens", "1024",
             "--no-compile", "--dtype", "fp32", "--warmup-steps", "2", "--log-every", "1",
             "--lr", "3e-3"]


def test_train_export_resume_and_eval(tmp_path, tokenizer_dir, capsys):
    out = str(tmp_path / "run")
    assert train_lm.main(["--out", out, "--tokenizer", tokenizer_dir, "--max-steps", "8"]
                         + TINY_ARGS) == 0
    rows = list(csv.DictReader(open(os.path.join(out, "loss_log.csv"))))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert {int(r["seq_len"]) for r in rows} == {256, 320}
    assert float(rows[-1]["lm_loss"]) < float(rows[0]["lm_loss"])
    assert os.path.getsize(os.path.join(out, "loss_curve.png")) > 1000
    model_dir = os.path.join(out, "model")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert os.path.exists(os.path.join(model_dir, name)), name
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    assert cfg["max_position_embeddings"] == 320 and cfg["vocab_size"] == 1024
    m = LlamaForCausalLM.from_pretrained(model_dir)
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    for k, v in m.hf_state_dict().items():
        assert torch.equal(v, ck["model"][k]), k

    # Resume continues the step count and the log.
    assert train_lm.main(["--out", out, "--tokenizer", tokenizer_dir, "--max-steps", "10",
                          "--resume"] + TINY_ARGS) == 0
    rows = list(csv.DictReader(open(os.path.join(out, "loss_log.csv"))))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert "resumed from" in capsys.readouterr().out

    assert eval_retrieval.main(["--model", model_dir, "--lengths", "256", "--samples", "2",
                                "--nll-tokens", "600"]) == 0
    text = capsys.readouterr().out
    assert "| passkey |" in text and "| vartrack |" in text and "mean NLL" in text


def test_locret_and_gate_commands(tmp_path, tokenizer_dir, capsys):
    out = str(tmp_path / "run")
    assert train_lm.main(["--out", out, "--tokenizer", tokenizer_dir, "--max-steps", "2"]
                         + TINY_ARGS) == 0
    model_dir = os.path.join(out, "model")
    heads = str(tmp_path / "locret.safetensors")
    assert locret.main(["--model", model_dir, "--out", heads, "--data", "tasks", "--seq-len",
                        "256", "--train-samples", "3", "--heldout-samples", "2", "--steps", "6",
                        "--d-r", "16", "--log-every", "2"]) == 0
    rep = json.load(open(str(tmp_path / "locret.json")))
    assert 0.0 <= rep["top10_overlap_after"] <= 1.0
    assert rep["heldout_loss_after"] < rep["heldout_loss_before"]
    g = str(tmp_path / "gates.safetensors")
    assert gates.main(["--model", model_dir, "--out", g, "--data", "sample", "--seq-len", "64",
                       "--batch", "2", "--train-samples", "4", "--heldout-samples", "2",
                       "--steps", "4", "--gate-heads", "2", "--gate-head-dim", "8",
                       "--log-every", "2"]) == 0
    rep = json.load(open(str(tmp_path / "gates.json")))
    assert 0.0 <= rep["after"]["eviction_ratio"] <= 1.0 and rep["after"]["nll_full"] > 0


@pytest.mark.parametrize("module", ["data", "tokenizer", "train_lm", "eval_retrieval",
                                    "locret", "gates", "evict_ref"])
def test_help(module):
    out = subprocess.run([sys.executable, "-m", f"kvgate_train.{module}", "--help"],
                         cwd=TRAINING_DIR, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
