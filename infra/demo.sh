#!/usr/bin/env bash
# The README's main command (`make demo`): the whole product on this machine, on loopback.
#  1. local stack up: SeaweedFS S3, MLflow server (artifacts in S3), Ray head + dashboard
#  2. the generated fine-grained data set, prepared into s3://wsdan/data/synthetic-k10
#  3. the stand-in pretrained backbone, made once and kept in s3://wsdan/weights/
#  4. `ray job submit` of the distributed training job (2 workers), registered in MLflow
# Re-running reuses the data set and the weights; the job name is new each time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WSDAN="$PY -m wsdan.cli"
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0

echo "== 1/4 local stack"
$WSDAN stack up
eval "$($WSDAN stack env)"

DATA=s3://wsdan/data/synthetic-k10
WEIGHTS=s3://wsdan/weights/resnet18_layer3_glyphs.pt
echo "== 2/4 generated data set -> $DATA"
$PY -m jobs.generate_data --dest .wsdan/data/synthetic-k10-128 --num-classes 10 \
    --n-train 2000 --n-val 400 --n-test 400
$PY -m jobs.prepare_data --format synthetic --src .wsdan/data/synthetic-k10-128 --dest "$DATA"

echo "== 3/4 stand-in pretrained backbone -> $WEIGHTS"
$PY -m jobs.pretrain --out "$WEIGHTS"

NAME="demo-$(date +%Y%m%d-%H%M%S)"
echo "== 4/4 ray job submit: $NAME"
# The job's S3 endpoint, a reference to the S3 keys (a 0600 credentials file) and the
# MLflow URI travel in its runtime_env, as on any cluster; the Ray head has none of them.
.venv/bin/ray job submit --address "$RAY_DASHBOARD_URL" --working-dir . \
    --runtime-env-json "$($WSDAN stack runtime-env)" -- \
    python -m jobs.train --config jobs/configs/synthetic_cpu.yaml --name "$NAME" \
    --storage-path s3://wsdan/runs --num-workers 2 --register-as wsdan-synthetic \
    "data.source=$DATA" "model.weights=$WEIGHTS" | tee ".wsdan/$NAME.log"

echo
echo "MLflow UI:      $MLFLOW_TRACKING_URI  (experiment 'wsdan', model 'wsdan-synthetic')"
echo "Ray dashboard:  $RAY_DASHBOARD_URL"
echo "Stop the stack: .venv/bin/wsdan stack down"
