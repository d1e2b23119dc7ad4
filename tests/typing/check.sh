#!/usr/bin/env bash
# Type-check tests/typing/readme_usage.py — a user's script over the public API — against the INSTALLED gmd_ext, as
# a user would: from a folder outside the checkout (inside it, mypy would read the checkout's sources as the user's
# own code). mypy --strict (mypy.ini) and basedpyright in strict mode (pyrightconfig.json).
#
# Needs `pip install ".[typing]"` and an install that type checkers can see: not editable, or editable with
# `--config-settings editable_mode=compat` (setuptools' default editable finder is an import hook that neither
# mypy nor pyright runs: they then report gmd_ext as not found). PYTHON picks the interpreter (default: python).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$(command -v "${PYTHON:-python}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/readme_usage.py" "$here/mypy.ini" "$here/pyrightconfig.json" "$work/"
cd "$work"
"$py" -c "import gmd_ext, sys; print('gmd_ext from', gmd_ext.__file__)"
"$py" -m mypy --config-file mypy.ini --cache-dir "$work/.mypy_cache" readme_usage.py
"$py" -m basedpyright -p . --pythonpath "$py"
