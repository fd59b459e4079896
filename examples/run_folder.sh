#!/usr/bin/env bash
# Copy and edit: run a TTT fine-tune over a folder of recordings on whatever device is present.
#   BASE:       a local Kyutai-layout folder, or a Hugging Face repo id (downloads once)
#   CHECKPOINT: a fine-tune run folder (the latest checkpoints/checkpoint_NNNNNN is used),
#               a checkpoint folder, or its consolidated/ folder
set -euo pipefail
BASE=${BASE:-kyutai/moshiko-pytorch-bf16}
CHECKPOINT=${CHECKPOINT:?set CHECKPOINT to your TTT fine-tune folder}
IN=${1:?usage: run_folder.sh IN_DIR OUT_DIR}
OUT=${2:?usage: run_folder.sh IN_DIR OUT_DIR}
moshi-ttt infer "$IN" "$OUT" --base "$BASE" --checkpoint "$CHECKPOINT" --text
# Rerunning the same line after an interruption finishes only the files not done yet.
