#!/usr/bin/env bash
# After `python -m kvgate_train.train_lm --out training/runs/default` has finished: copies the
# exported default model into models/kvgate-default, measures its held-out retrieval accuracy,
# and trains and reports Locret retaining heads and Attention-Gate gates for it and for
# ../shared/models/stories260K (two jobs at a time, one thread each). Run from the repository
# root. Every output lands beside the weights it describes (*.json reports, *.log).
set -euo pipefail
RUN=${RUN:-training/runs/default}
OUT=models/kvgate-default
STORIES=../shared/models/stories260K
SOUT=models/stories260K-eviction
export PYTHONPATH=training
mkdir -p "$OUT" "$SOUT"
for f in config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json; do
  cp "$RUN/model/$f" "$OUT/$f"
done
cp "$RUN/loss_curve.png" "$RUN/loss_log.csv" "$RUN/train_args.json" "$OUT/"
tail -n 3 "$RUN/train.log" > "$OUT/train_summary.txt" || true

echo "== retrieval accuracy (full cache) and Locret heads for stories260K"
python3 -m kvgate_train.eval_retrieval --model "$OUT" --lengths 512,1024,2048 --samples 50 \
  --threads 1 --json-out "$OUT/retrieval_eval.json" > "$OUT/retrieval_eval.md" &
python3 -m kvgate_train.locret --model "$STORIES" --out "$SOUT/locret.safetensors" --data sample \
  --seq-len 512 --train-samples 200 --heldout-samples 20 --steps 800 --threads 1 \
  > "$SOUT/locret.log" 2>&1 &
wait
cat "$OUT/retrieval_eval.md"
echo "== Locret heads for the default model; gates for stories260K"
python3 -m kvgate_train.locret --model "$OUT" --out "$OUT/locret.safetensors" --threads 1 \
  > "$OUT/locret.log" 2>&1 &
python3 -m kvgate_train.gates --model "$STORIES" --out "$SOUT/attention_gate.safetensors" \
  --data sample --seq-len 256 --train-samples 400 --heldout-samples 32 --steps 300 --threads 1 \
  > "$SOUT/attention_gate.log" 2>&1 &
wait
echo "== gates for the default model"
python3 -m kvgate_train.gates --model "$OUT" --out "$OUT/attention_gate.safetensors" \
  --ratio-of flags --lr 3e-4 --threads 2 \
  > "$OUT/attention_gate.log" 2>&1
tail -n 2 "$OUT/locret.log" "$SOUT/locret.log" "$OUT/attention_gate.log" "$SOUT/attention_gate.log"
