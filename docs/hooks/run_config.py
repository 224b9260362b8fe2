"""MkDocs hook: the run-config reference's default and allowed columns come from the code.

docs/reference.md holds, for every run-config key, a table row with the key and its
meaning in words: `| `noise` | the noise multiplier ... |`, under a `| key | meaning |`
header. At build time this hook inserts two columns between them: the default, read
from `[tool.flwr.app.config]` in pyproject.toml (what `flwr run` uses), and what is
allowed, read from `dpfl_app.config.KEYS` (what the app checks). So the reference
cannot drift from the code, and a key added to config.KEYS without a row in the
reference (or a row for a key that is gone) fails the build, and with it the test
suite (tests/test_docs.py builds the site with --strict).

A hook rather than a generated file: the meanings are prose with links into the other
pages, which belong in a Markdown page that people edit; the values belong to the code.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
PAGE = "reference.md"
HEADER = "| key | meaning |"
ROW = re.compile(r"^\| `([a-z][a-z-]*)` \| (.+) \|$")


class ReferenceError(Exception):
    """The reference page and config.KEYS disagree."""


def _keys():
    if str(PROJECT) not in sys.path:  # this checkout's code, not an installed copy
        sys.path.insert(0, str(PROJECT))
    from dpfl_app.config import KEYS

    return KEYS


def defaults() -> dict:
    return tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def _toml(value) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return '`"' + value + '"`'
    return f"`{value}`"


def _allowed(key) -> str:
    if key.allowed:
        return key.allowed
    return {bool: "true or false", str: "a string", int: "an integer", float: "a number"}[key.kind]


def fill(markdown: str, keys=None, values=None) -> str:
    """The page with the default and allowed columns filled in; ReferenceError if a key
    of `keys` has no row, or a row names no key of `keys`."""
    keys = _keys() if keys is None else keys
    values = defaults() if values is None else values
    out, seen = [], []
    lines = iter(markdown.splitlines())
    for line in lines:
        if line.strip() == HEADER:
            out += ["| key | default | allowed | meaning |", "|---|---|---|---|"]
            next(lines)  # the two-column separator
            continue
        row = ROW.match(line.strip())
        if row:
            name, meaning = row.groups()
            if name not in keys:
                raise ReferenceError(f"{PAGE}: row for {name!r}, which is not a run-config key "
                                     "of dpfl_app/config.py")
            seen.append(name)
            line = f"| `{name}` | {_toml(values[name])} | {_allowed(keys[name])} | {meaning} |"
        out.append(line)
    missing = [name for name in keys if name not in seen]
    if missing:
        raise ReferenceError(f"{PAGE}: no row for run-config key(s) {', '.join(missing)}: add "
                             "each, with its meaning, to a `| key | meaning |` table")
    twice = sorted({name for name in seen if seen.count(name) > 1})
    if twice:
        raise ReferenceError(f"{PAGE}: more than one row for {', '.join(twice)}")
    return "\n".join(out) + "\n"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != PAGE:
        return markdown
    from mkdocs.exceptions import PluginError

    try:
        return fill(markdown)
    except ReferenceError as error:
        raise PluginError(str(error)) from error
