#!/usr/bin/env bash
# The main job on the local cluster: start (or reuse) the Ray head + MLflow server, then submit
# each pipeline stage with `ray job submit`.
# Usage: bash scripts/run_demo.sh [configs/demo.yaml [key=value ...]]   (overrides go to every stage)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/demo.yaml}
shift $(( $# > 0 ? 1 : 0 ))
OVERRIDES=("$@")
VENV_BIN="$PWD/.venv/bin"
export PATH="$VENV_BIN:$PATH"

service_env=$(python -m notellm.cli services start --config "$CONFIG" --print-env)  # exits on failure
eval "$service_env"
echo "[demo] Ray dashboard: $RAY_API_SERVER_ADDRESS   MLflow: $MLFLOW_TRACKING_URI"

started=$SECONDS
submit() {  # submit <stage> [key=value ...]
    local stage=$1
    shift
    echo "[demo] $(date -u +%H:%M:%S) ray job submit -- python -m pipelines.$stage --config $CONFIG ${OVERRIDES[*]} $*"
    ray job submit --address "$RAY_API_SERVER_ADDRESS" --working-dir . \
        --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"$MLFLOW_TRACKING_URI\"}}" \
        -- python -m "pipelines.$stage" --config "$CONFIG" "${OVERRIDES[@]}" "$@"
}
run_name=$(python -c "import sys; from notellm.config import load_config; c = load_config(sys.argv[1], sys.argv[2:]); print(c.training.run_name + c.evaluation.ablation_suffix)" "$CONFIG" "${OVERRIDES[@]}")

submit ingest
submit mine_pairs
submit build_prompts
submit train
submit train training.alpha=0 "training.run_name=$run_name"   # the w/o-CSFT ablation
submit embed
submit build_index
submit evaluate
echo "[demo] main job done in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s (the table above is also in <data.work_dir>/eval/comparison.md and in MLflow)"
