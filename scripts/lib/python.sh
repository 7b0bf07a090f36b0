# Sourced by the commands in scripts/ (not a command itself): bertpool_python NAME sets $py to the Python
# that runs bertpool, or exits 2 with one line saying how to get one. In order: $BERTPOOL_PYTHON (a path or
# a command name; one that does not run is an error, never a silent fallback), the repository's .venv
# (made by scripts/setup), else python3 where it has bertpool installed (e.g. an activated Neuron venv).
bertpool_python() {
    local name="$1" root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    if [ -n "${BERTPOOL_PYTHON:-}" ]; then
        if ! py="$(command -v -- "$BERTPOOL_PYTHON")" || [ ! -x "$py" ]; then
            echo "$name: error: BERTPOOL_PYTHON=$BERTPOOL_PYTHON is not an executable Python" >&2
            exit 2
        fi
    elif [ -x "$root/.venv/bin/python" ]; then
        py="$root/.venv/bin/python"
    elif command -v python3 >/dev/null 2>&1 && python3 -c 'import bertpool' >/dev/null 2>&1; then
        py=python3
    else
        echo "$name: error: bertpool is not installed: run scripts/setup first (it makes $root/.venv)," \
             "or set BERTPOOL_PYTHON to a Python that has bertpool installed" >&2
        exit 2
    fi
}
