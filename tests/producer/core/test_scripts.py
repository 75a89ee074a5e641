"""Redis Lua scripts live in ``lua/*.lua`` beside the module that runs them: each documents its KEYS, ARGV and
answer in a header, each is read by a module (no orphan script), and each ships as package data."""

from __future__ import annotations

import ast
import fnmatch
import importlib
import re
import tomllib
from pathlib import Path

import pytest

from producer.core.scripts import read_lua

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = sorted(p for top in ("producer", "worker") for p in (ROOT / top).rglob("*.lua"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _header(source: str) -> list[str]:
    """The comment lines the script opens with, up to its first line of code."""
    lines = []
    for line in source.splitlines():
        if line.startswith("--"):
            lines.append(line)
        elif line.strip():
            break
    return lines


def _readers(script: Path) -> list[str]:
    """Modules beside the script's ``lua/`` folder that call ``read_lua(__package__, "<its name>")``."""
    found = []
    for module in sorted(script.parent.parent.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "read_lua"
                and len(node.args) == 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == script.name
            ):
                found.append(".".join(module.relative_to(ROOT).with_suffix("").parts))
    return found


def test_the_scripts_are_found() -> None:
    assert len(SCRIPTS) >= 9, [_rel(p) for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=_rel)
def test_each_script_opens_with_a_header_naming_every_key_and_argument_it_reads_and_what_it_returns(
    script: Path,
) -> None:
    source = script.read_text(encoding="utf-8")
    header = _header(source)
    assert header, f"{_rel(script)} must open with a -- comment header"
    text = "\n".join(header)
    body = source[len(text) :]
    if re.match(r"^-- \w+\(.*\): a function for other scripts", header[0]):  # its source goes before theirs
        assert re.search(r"^-- Returns: \S", text, re.M), f"{_rel(script)}: header does not say what it returns"
        assert not re.search(r"\b(?:KEYS|ARGV)\[", body), f"{_rel(script)}: a function takes its keys as arguments"
        return
    assert re.search(r"^-- KEYS\[1\]: \S", text, re.M), f"{_rel(script)}: header names no KEYS"
    assert re.search(r"^-- ARGV(\[\d+\])?: \S", text, re.M), f"{_rel(script)}: header names no ARGV (or 'ARGV: none')"
    assert re.search(r"^-- Returns: \S", text, re.M), f"{_rel(script)}: header does not say what it returns"
    for used in sorted(set(re.findall(r"\b(?:KEYS|ARGV)\[\d+\]", body))):
        assert re.search(rf"^-- {re.escape(used)}: \S", text, re.M), f"{_rel(script)}: {used} is not in its header"


@pytest.mark.parametrize("script", SCRIPTS, ids=_rel)
def test_each_script_is_read_by_a_module_beside_it(script: Path) -> None:
    readers = _readers(script)
    assert readers, f"{_rel(script)} is read by no module in {_rel(script.parent.parent)}/ (an orphan script)"
    source = script.read_text(encoding="utf-8")
    for name in readers:
        module = importlib.import_module(name)
        # alone, or after the source of a function it calls (announce.lua)
        held = [value for value in vars(module).values() if isinstance(value, str) and value.endswith(source)]
        assert held, f"{name} does not hold {script.name} after import"


@pytest.mark.parametrize("script", SCRIPTS, ids=_rel)
def test_each_script_ships_as_package_data(script: Path) -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    top, *rest = script.relative_to(ROOT).parts
    inside = "/".join(rest)
    assert any(fnmatch.fnmatch(inside, glob) for glob in package_data.get(top, [])), (
        f"{_rel(script)} matches no glob of [tool.setuptools.package-data] {top}: an installed wheel would lack it"
    )


def test_read_lua_names_the_missing_script() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-script.lua"):
        read_lua("producer.core", "no-such-script.lua")
    with pytest.raises(ValueError, match="__package__"):
        read_lua(None, "transition.lua")
