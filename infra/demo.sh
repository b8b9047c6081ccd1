#!/usr/bin/env bash
# The README's main command (`make demo`): the whole product on this machine, on loopback.
#  1. local stack up: SeaweedFS S3, MLflow server (artifacts in S3), Ray head + dashboard
#  2. the generated fine-grained data set, prepared into s3://wsdan/data/synthetic-k10
#  3. the stand-in pretrained backbone, made once and kept in s3://wsdan/weights/
#  4. `ray job submit` of the distributed training job (2 workers), registered in MLflow
# Re-running reuses the data set and the weights; the job name is new each time.
# Sized for a 2-core machine without GPU: the quick stand-in pretraining (2,000 images,
# 4 epochs: the learning test shows a fine-tune from it far above chance, attending to the
# object) and 4 job epochs on <= 2 cores, 6 above (WSDAN_DEMO_EPOCHS overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
START=${WSDAN_DEMO_START:-$(date +%s)}  # make demo passes the time before the install
PY=${PY:-.venv/bin/python}
WSDAN="$PY -m wsdan.cli"
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0

echo "== 1/4 local stack"
$WSDAN stack up
eval "$($WSDAN stack env)"

DATA=s3://wsdan/data/synthetic-k10
WEIGHTS=s3://wsdan/weights/resnet18_layer3_glyphs_quick.pt
CORES=$(nproc 2>/dev/null || echo 2)
EPOCHS=${WSDAN_DEMO_EPOCHS:-$([ "$CORES" -le 2 ] && echo 4 || echo 6)}
echo "== 2/4 generated data set -> $DATA"
$PY -m jobs.generate_data --dest .wsdan/data/synthetic-k10-128 --num-classes 10 \
    --n-train 2000 --n-val 400 --n-test 400
$PY -m jobs.prepare_data --format synthetic --src .wsdan/data/synthetic-k10-128 --dest "$DATA"

echo "== 3/4 stand-in pretrained backbone -> $WEIGHTS"
$PY -m jobs.pretrain --out "$WEIGHTS" --n-train 2000 --n-val 300 \
    optim.epochs=4 optim.lr_step_epochs=3

NAME="demo-$(date +%Y%m%d-%H%M%S)"
echo "== 4/4 ray job submit: $NAME ($EPOCHS epochs)"
# The job's S3 endpoint, a reference to the S3 keys (a 0600 credentials file) and the
# MLflow URI travel in its runtime_env, as on any cluster; the Ray head has none of them.
.venv/bin/ray job submit --address "$RAY_DASHBOARD_URL" --working-dir . \
    --runtime-env-json "$($WSDAN stack runtime-env)" -- \
    python -m jobs.train --config jobs/configs/synthetic_cpu.yaml --name "$NAME" \
    --storage-path s3://wsdan/runs --num-workers 2 --register-as wsdan-synthetic \
    "data.source=$DATA" "model.weights=$WEIGHTS" "optim.epochs=$EPOCHS" \
    | tee ".wsdan/$NAME.log"

ELAPSED=$(( $(date +%s) - START ))
echo
echo "Demo finished in $((ELAPSED / 60)) min $((ELAPSED % 60)) s (install included when make"
echo "demo installed the project). The job's output is kept in .wsdan/$NAME.log."
echo "MLflow UI:      $MLFLOW_TRACKING_URI  (experiment 'wsdan', model 'wsdan-synthetic')"
echo "Ray dashboard:  $RAY_DASHBOARD_URL"
echo "Serve it:       .venv/bin/wsdan serve wsdan-synthetic   (after: eval \"\$(.venv/bin/wsdan stack env)\")"
echo "Stop the stack: .venv/bin/wsdan stack down"
