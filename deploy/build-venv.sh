#!/bin/sh
# Build the agent's virtual environment: used by the Dockerfile's build stage and by the
# deployment test, so both install the project the same way.
#   sh deploy/build-venv.sh PREFIX SOURCE_DIR [EXTRAS]     (EXTRAS: e.g. "otel")
set -eu
prefix="$1"
source_dir="$2"
extras="${3:-}"
python3 -m venv "$prefix"
"$prefix/bin/pip" install --no-cache-dir --disable-pip-version-check --no-compile "$source_dir${extras:+[$extras]}"
"$prefix/bin/python" -m compileall -q "$prefix/lib"
