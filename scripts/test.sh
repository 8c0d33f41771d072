#!/usr/bin/env bash
# The whole test suite from a fresh checkout: set-up, the bundled corpus, then pytest.
# Tests start their own redis-server on free ports; nothing here touches a shared one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ARRL_VENV:-.venv}
"$VENV/bin/arrl" prepare >/dev/null
exec "$VENV/bin/python" -m pytest -q -m "not benchmark" "$@"
