#!/usr/bin/env bash
# Set up the project from scratch: a virtual environment in .venv with the pinned working
# set (constraints.txt). Safe to re-run: it does nothing when the stamp is newer than the
# dependency files. Needs Python 3.11 and git; works offline except for the package index.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY="$c"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)." >&2
  exit 2
fi

# Chromium for the studio's browser test (tests/e2e/test_studio_browser.py): the system
# package, never Playwright's own browser download. Checked on every run (cheap), before the
# stamp, so a machine set up earlier gets it too.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium (apt-get) for the studio browser test"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be current already; refresh them only if the first try fails.
    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 || true; apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
      || echo "setup: could not install chromium; the studio browser test will be skipped (it fails under CI=true)" >&2
  else
    echo "setup: /usr/bin/chromium is missing; install it for the studio browser test, e.g." \
         "sudo apt-get install chromium (it is skipped without it, and fails under CI=true)" >&2
  fi
fi

stamp=.venv/.setup-stamp
if [ -f "$stamp" ] && [ "$stamp" -nt constraints.txt ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
# torch first, pinned: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==$(grep -E '^torch==' constraints.txt | cut -d= -f3)"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
# optimum-quanto compiles its CPU int4 unpack kernel (C++, ninja) on first use, ~30-80 s: build it
# now, once per environment, instead of inside the first int4 quantization or QLoRA run.
.venv/bin/python -c "from stunning.training.quantized import load_quanto_kernel; load_quanto_kernel()" \
  || echo "setup: could not build optimum-quanto's C++ kernel; the first int4 quantization will try again" >&2

# DVC needs a git repository; a download of the sources without .git gets one here.
if [ ! -d .git ]; then
  git init -q && git add -A && git -c user.name=setup -c user.email=setup@localhost commit -qm "initial import"
fi
touch "$stamp"
echo "setup: environment ready in .venv"
