"""Run every Python example of the documentation, each in a fresh interpreter.

Every ``.. code-block:: python`` in ``docs/*.rst`` is a complete program: this script runs
each one with the current interpreter in an empty temporary directory and fails if any of
them exits with an error. Fragments that are not meant to run are written in other code
blocks (``text``, ``console``, ``json``, ``ini``).

Usage: ``python docs/run_examples.py [-v] [PAGE.rst ...]``; ``-v`` shows what each example
printed, to compare with the output the page shows.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

DOCS = Path(__file__).resolve().parent
DIRECTIVE = re.compile(r"^(\s*)\.\. code-block:: python\s*$")
TIMEOUT = 60


def examples(page: Path) -> list[tuple[int, str]]:
    """Return ``(line number, code)`` for each Python code block of ``page``."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        match = DIRECTIVE.match(lines[i])
        i += 1
        if not match:
            continue
        indent = len(match.group(1))
        while i < len(lines) and lines[i].strip().startswith(":"):  # directive options
            i += 1
        start = i
        body = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            body.append(lines[i])
            i += 1
        found.append((start + 1, textwrap.dedent("\n".join(body)).strip() + "\n"))
    return found


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    pages = [Path(a) for a in argv if a != "-v"] or sorted(DOCS.glob("*.rst"))
    failed = 0
    total = 0
    for page in pages:
        for line, code in examples(page):
            total += 1
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    run = subprocess.run(
                        [sys.executable, "-c", code],
                        check=False,
                        cwd=tmp,
                        capture_output=True,
                        text=True,
                        timeout=TIMEOUT,
                    )
                except subprocess.TimeoutExpired:
                    print(f"{page.name}:{line}: timed out after {TIMEOUT} s")
                    failed += 1
                    continue
            if run.returncode != 0:
                failed += 1
                print(f"{page.name}:{line}: exit status {run.returncode}\n{run.stderr}")
            else:
                print(f"{page.name}:{line}: ok")
                if verbose and run.stdout:
                    print(textwrap.indent(run.stdout, "    "), end="")
    print(f"{total - failed} of {total} examples ran cleanly")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
