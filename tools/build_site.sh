#!/usr/bin/env bash
# Build the book as a static site and check it in a real browser, offline (run before every release).
#   bash tools/build_site.sh            # -> book/_build/html, screenshots in book/_build/screenshots
# Warnings are errors (broken cross-references, unknown citations). The check needs Debian's chromium
# (apt-get install chromium) and the `site` extra (playwright, which drives the system Chromium: nothing is
# downloaded). Set OMP_NUM_THREADS as you like; the chapters set their own torch thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run bash .ci/setup first"; exit 1; }
.venv/bin/python -c "import playwright" 2>/dev/null || .venv/bin/python -m pip install -q -e '.[site]'
start=$(date +%s)
.venv/bin/jupyter-book build -W -n --keep-going book/
echo "book built in $(( $(date +%s) - start )) s"
.venv/bin/python tools/check_site.py book/_build/html --screenshots book/_build/screenshots
