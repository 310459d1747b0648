#!/usr/bin/env bash
# The main job on the local cluster: start (or reuse) the Ray head + MLflow server, then submit
# each pipeline stage with `ray job submit`. Usage: bash scripts/run_demo.sh configs/demo.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/demo.yaml}
VENV_BIN="$PWD/.venv/bin"
export PATH="$VENV_BIN:$PATH"

service_env=$(python -m notellm.cli services start --config "$CONFIG" --print-env)  # exits on failure
eval "$service_env"
echo "[demo] Ray dashboard: $RAY_API_SERVER_ADDRESS   MLflow: $MLFLOW_TRACKING_URI"

submit() {
    echo "[demo] ray job submit -- python -m pipelines.$1 --config $CONFIG"
    ray job submit --address "$RAY_API_SERVER_ADDRESS" --working-dir . \
        --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"$MLFLOW_TRACKING_URI\"}}" \
        -- python -m "pipelines.$1" --config "$CONFIG"
}

submit ingest
submit mine_pairs
submit build_prompts
