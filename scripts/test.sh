#!/usr/bin/env bash
# Install the project with its dev extras (test, lint, docs), then run the checks:
# the generated thread twins (scripts/unasync.py --check), ruff, mypy --strict
# on src/, the documentation site (mkdocs build --strict), and pytest -- which also
# runs every Python snippet of README.md and docs/ -- on every CPython 3.11, 3.12
# and 3.13 found on this machine (at least the default python3).
#
#   bash scripts/test.sh              # everything
#   bash scripts/test.sh -k forget    # extra arguments go to pytest
#   PYTEST_WORKERS=0 bash scripts/test.sh   # pytest in one process (default: 2 workers)
#
# pytest runs on PYTEST_WORKERS pytest-xdist workers (2), each running whole files
# (--dist loadfile: a page of docs/ runs its snippets in order in one process, a
# module's fixtures are made once); every server a test starts listens on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # find_python 3.12 -> path of an interpreter of that version, or nothing
    local want=$1 candidate
    for candidate in "python$want" "$HOME/.pyenv/versions/$want".*/bin/python /usr/bin/python"$want" \
                     /usr/local/bin/python"$want"; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

pythons=()
for version in 3.11 3.12 3.13; do
    if interpreter=$(find_python "$version"); then
        pythons+=("$interpreter")
    fi
done
if [ ${#pythons[@]} -eq 0 ]; then
    default=$(command -v python3 || command -v python)
    "$default" -c 'import sys; assert sys.version_info >= (3, 11), "pysingleflight needs Python 3.11+"'
    pythons=("$default")
fi

status=0
first=1
for python in "${pythons[@]}"; do
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    venv=".venv-test-$version"
    echo "=== Python $version ($python)"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
    if [ $first -eq 1 ]; then
        echo "--- generated modules (scripts/unasync.py --check)"
        "$venv/bin/python" scripts/unasync.py --check || status=1
        echo "--- ruff"
        "$venv/bin/python" -m ruff check . || status=1
        "$venv/bin/python" -m ruff format --check . || status=1
        echo "--- mypy --strict src/"
        "$venv/bin/python" -m mypy || status=1
        echo "--- docs (mkdocs build --strict)"
        site=$(mktemp -d)
        NO_MKDOCS_2_WARNING=1 "$venv/bin/python" -m mkdocs build --strict --quiet --site-dir "$site" || status=1
        rm -rf "$site"
        first=0
    fi
    echo "--- pytest (Python $version)"
    "$venv/bin/python" -m pytest -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" ||
        status=1
done
exit $status
