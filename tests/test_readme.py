"""The README's promises run: every command of its quick start and its Python example, as written (CI runs
its install and test lines; this runs the rest), in a fresh folder."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str) -> list[tuple[str, str]]:
    """(the heading above it, the code) of every fenced block in `language`."""
    found, heading = [], ""
    for part in re.split(r"^(```\w*\n.*?^```)\n", README.read_text(), flags=re.S | re.M):
        if part.startswith("```"):
            lang, _, code = part.partition("\n")
            if lang[3:] == language:
                found.append((heading, code.rsplit("```", 1)[0]))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            heading = headings[-1] if headings else heading
    return found


def _quick_start() -> list[list[str]]:
    blocks = [code for heading, code in _blocks("bash") if heading.lower().startswith("quick start")]
    assert len(blocks) == 1, "the README has one quick-start block"
    lines = [line.split("#", 1)[0].strip() for line in blocks[0].splitlines()]
    return [shlex.split(line) for line in lines if line]


def test_the_quick_start_is_found():
    commands = _quick_start()
    assert len(commands) >= 3 and all(c[0] == "unsparse-tvm" for c in commands)
    assert [c[1] for c in commands][:2] == ["prune", "compile"]


@pytest.mark.slow
def test_every_quick_start_command_runs(tmp_path, monkeypatch, capsys):
    from unsparse_tvm.cli import main

    monkeypatch.chdir(tmp_path)
    for command in _quick_start():
        assert main(command[1:]) == 0, f"README quick start: {shlex.join(command)}\n{capsys.readouterr().err}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".pt2", ".so"))  # it wrote its files


@pytest.mark.slow
def test_the_python_example_runs(tmp_path, monkeypatch):
    (code,) = [code for heading, code in _blocks("python") if heading == "In Python"]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (In Python)", "exec"), scope)  # noqa: S102 (our own README)
    assert (tmp_path / "smallcnn.so").exists()
    x = scope["torch"].randn(1, 1, 8, 8)
    reference = scope["net"](x)
    assert scope["fast"](x).allclose(reference, rtol=1e-4, atol=1e-4)  # the torch.compile backend, called
    assert scope["model"](x).allclose(reference, rtol=1e-4, atol=1e-4)
