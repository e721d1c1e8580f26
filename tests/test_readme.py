"""The README's usage example must really run."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest


def _find_readme() -> pathlib.Path:
    here = pathlib.Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "README.md"
        if candidate.exists() and "kv_cache_manager_v2" in candidate.read_text():
            return candidate
    pytest.skip("README.md not found next to the tests")


def test_readme_usage_example_runs() -> None:
    text = _find_readme().read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {})
    assert "reused tokens: 303" in out.getvalue()
