#!/usr/bin/env bash
# The paper's evaluation (docs/METHOD.md 4) on a stage-2 model: every set below whose folder exists under
# data/eval/ (each as `llm2clip eval --list` describes it), plus the built-in caption-retrieval accuracy.
#   bash configs/paper/eval.sh [MODEL_DIR] [more llm2clip eval options, e.g. --device cuda:1]
# MODEL_DIR defaults to the EVA02 run's model; the report goes to MODEL_DIR/../eval.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="${1:-$here/../../runs/paper/stage2-eva02-l14-336/model}"
shift || true
data="${EVAL_DATA:-$here/data/eval}"
llm2clip="${LLM2CLIP:-llm2clip}"
# short captions (Flickr30k, COCO), long captions (ShareGPT4V, Urban-1k, DOCCI), Chinese, ImageNet zero-shot
sets=(flickr30k coco sharegpt4v urban1k docci flickr30k-cn coco-cn imagenet)
args=(-b cupl-cra)
for name in "${sets[@]}"; do
  if [ -d "$data/$name" ]; then args+=(-b "$name=$data/$name"); else echo "skipped $name: no $data/$name" >&2; fi
done
exec $llm2clip eval "$model" "${args[@]}" --precision bf16 --batch-size 256 --workers 8 --out "$model/../eval" "$@"
