#!/usr/bin/env bash
# Thin wrapper around benchmarks/run.py: runs it with the Python of the softlb virtualenv.
# Picks $PYTHON, else the active virtualenv's python, else ./venv/bin/python or ../venv/bin/python
# next to the checkout, else python3. All flags go to run.py (see --help).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [[ -z "$py" && -n "${VIRTUAL_ENV:-}" ]]; then py="$VIRTUAL_ENV/bin/python"; fi
for candidate in "$root/.venv/bin/python" "$root/venv/bin/python" "$(dirname "$root")/venv/bin/python"; do
    if [[ -z "$py" && -x "$candidate" ]]; then py="$candidate"; fi
done
exec "${py:-python3}" "$here/run.py" "$@"
