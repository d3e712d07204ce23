#!/usr/bin/env bash
# One command to set up segpipe from a fresh clone and run something:
#   bash tools/quickstart.sh demo   # venv + install, then plan → … on the embedded dataset
#   bash tools/quickstart.sh test   # venv + install, then ruff (format + lint), mypy, the import contract and the test suite
# Extra arguments go to `segpipe demo` or pytest. Needs only python3 (>= 3.10) with venv.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
shift || true
case "$mode" in demo|test) ;; *) echo "usage: bash tools/quickstart.sh demo|test [args...]" >&2; exit 2;; esac

VENV="${SEGPIPE_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[quickstart] creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
# A bare `torch` requirement would pull a multi-GB CUDA build: pin the local CPU build first
# when no torch is present (an existing torch in range is kept).
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[quickstart] installing torch==2.13.0" >&2
  pip_install "torch==2.13.0"
fi
echo "[quickstart] installing segpipe and its dependencies" >&2
pip_install -e ".[dev]"

if [ "$mode" = demo ]; then
  exec "$VENV/bin/segpipe" demo "$@"
fi
echo "[quickstart] ruff format --check, ruff check, mypy, lint-imports" >&2
"$VENV/bin/ruff" format --check .
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
"$VENV/bin/lint-imports"
# The report tests open segpipe's HTML in a headless Chromium (tests/browser.py); without one they
# skip with the reason. Try to install it (apt-get update only when the plain install fails); a
# failure does not stop the run.
if [ -z "${SEGPIPE_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
  && ! command -v chromium-browser >/dev/null 2>&1 && ! command -v google-chrome >/dev/null 2>&1; then
  apt_get() {
    if [ "$(id -u)" -eq 0 ]; then env DEBIAN_FRONTEND=noninteractive apt-get "$@"
    else sudo -n env DEBIAN_FRONTEND=noninteractive apt-get "$@"; fi
  }
  if apt_log="$(apt_get install -y -q chromium 2>&1)" \
    || { apt_get update -q >/dev/null 2>&1 && apt_log="$(apt_get install -y -q chromium 2>&1)"; }; then
    echo "[quickstart] installed chromium (apt-get install chromium) for the browser tests" >&2
  else
    echo "[quickstart] no chromium and apt-get install chromium failed (${apt_log##*$'\n'}): the browser tests will skip" >&2
  fi
fi
echo "[quickstart] pytest" >&2
exec "$VENV/bin/python" -m pytest "$@"
