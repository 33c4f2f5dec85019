#!/bin/sh
# How the image installs the daemons. The Dockerfile runs it; tests/test_deploy.py runs the same script in a
# temporary directory, so the image's install steps are exercised where no Docker engine exists.
#
#   sh deploy/install.sh deps PREFIX      a virtual environment at PREFIX with the locked runtime dependencies
#   sh deploy/install.sh app PREFIX SRC   build SRC (the repository) into a wheel with the locked build tools,
#                                         install it into PREFIX, and check that no dependency is missing
#
# Only wheels are installed, each checked against its sha256 in the lock files; the project's own wheel,
# built here, is the one file without a hash. PYTHON names the interpreter (default: python3).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
locked="--no-input --only-binary=:all: --require-hashes"

case "${1:-}" in
deps)
    prefix=$2
    "$python" -m venv "$prefix"
    # shellcheck disable=SC2086  # $locked is a list of options
    "$prefix/bin/python" -m pip install $locked -r "$here/requirements.lock"
    ;;
app)
    prefix=$2
    src=$3
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$python" -m venv "$work/build"
    # shellcheck disable=SC2086
    "$work/build/bin/python" -m pip install $locked -r "$here/build-requirements.lock"
    "$work/build/bin/python" -m pip wheel --no-input --no-deps --no-build-isolation --wheel-dir "$work/dist" "$src"
    "$prefix/bin/python" -m pip install --no-input --no-deps --no-index "$work"/dist/*.whl
    "$prefix/bin/python" -m pip check
    ;;
*)
    echo "usage: $0 deps PREFIX | app PREFIX SRC" >&2
    exit 2
    ;;
esac
