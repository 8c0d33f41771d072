#!/usr/bin/env bash
# The whole test suite from a fresh checkout: set-up, the bundled corpus, then pytest.
# Tests start their own redis-server on free ports; nothing here touches a shared one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }  # as in scripts/setup.sh
command -v chromium >/dev/null || { echo "test: installing chromium with apt-get (tests/test_dashboard.py drives it headless)" >&2; as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
VENV=${ARRL_VENV:-.venv}
"$VENV/bin/arrl" prepare >/dev/null
# --durations: the slowest tests named in every log, so a suite that creeps towards its limit shows where.
exec "$VENV/bin/python" -m pytest -q -m "not benchmark" --durations=15 "$@"
