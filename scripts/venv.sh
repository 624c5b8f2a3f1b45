# Sourced by scripts/quickstart.sh and .ci/run: packages and the project's virtual environment.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Prints the interpreter to install into and run with: the active virtual environment's, else the
# one of the venv directory $2 (default .venv), created from interpreter $1 (default python3) when
# missing. Debian's python3 refuses system-wide pip installs (PEP 668) and ships venv separately.
project_python() {
  local base="${1:-python3}" venv="${2:-.venv}"
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    echo "$VIRTUAL_ENV/bin/python"
    return
  fi
  if [ ! -x "$venv/bin/python" ]; then
    if ! "$base" -c "import venv, ensurepip" >/dev/null 2>&1; then
      echo "installing python3-venv (apt-get)..." >&2
      apt_install python3-venv >&2
    fi
    echo "creating the virtual environment $venv with $("$base" -c 'import sys; print(sys.executable)')" >&2
    "$base" -m venv "$venv" >&2
  fi
  echo "$PWD/$venv/bin/python"
}
