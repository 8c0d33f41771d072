#!/usr/bin/env bash
# The main job from a fresh checkout: set-up, the bundled corpus, then a real campaign on the
# embedded defaults (a private redis-server, local workers, the cpu profile). Extra arguments
# go to `arrl run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ARRL_VENV:-.venv}
"$VENV/bin/arrl" prepare
exec "$VENV/bin/arrl" run --profile cpu --max-experiments 8 "$@"
