"""Every code example of the docs site (``docs/**/*.md``) and of the README runs, as written.

Each fenced code block is one test, named ``FILE:LINE-LANGUAGE``:

- ``python`` blocks are executed. The python blocks of one page share one namespace, like the cells of a
  notebook.
- ``bash`` (``sh``, ``shell``, ``console``) blocks run with ``bash -e -o pipefail``, the virtualenv's ``unimm`` and
  ``python`` first on ``PATH``. A block of plain ``unimm ARGS`` commands runs in this process through
  ``unimm.cli.main``, the console script's entry point, which saves a torch import per command.
- ``yaml`` and ``json`` blocks are parsed.
- Other blocks (text, diagrams, ``mermaid``, no language) are not examples.

The blocks of a page run in order, in one working folder: a block runs the earlier blocks of its page first
when they have not run in this session, so ``-k`` may pick any one.

Every page runs in a working folder of its own (one per session) holding what the examples name: ``shoe.png``
(a Fashion-MNIST test image, ``docs/assets/shoe.png``), ``checkpoints/demo`` (the demo model shipped in the
package) and ``recipes/`` (the repository's recipes, read only).

An HTML comment on the line before a block (blank lines between are allowed) says how it runs:

- ``<!-- example: skip (REASON) -->``: not run; the test is reported skipped with REASON (it needs a GPU, the
  Hub, a running server or a long training run).
- ``<!-- example: integration -->``: the ``integration`` tier (``make test``), for examples of more than about a
  second. The later blocks of the same page inherit it, since they may build on it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]

MARKER = re.compile(
    r"^\s*<!--\s*example:\s*(?P<kind>skip|integration)\s*(?:\((?P<reason>[^)]*)\))?\s*-->\s*$"
)
ANY_MARKER = re.compile(r"<!--\s*example")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
LANGUAGES = {
    "python": "python",
    "py": "python",
    "bash": "bash",
    "sh": "bash",
    "shell": "bash",
    "console": "bash",
    "yaml": "yaml",
    "yml": "yaml",
    "json": "json",
}
# Shell syntax that only bash can run (a block with any of it is not run in-process).
SHELL_SYNTAX = re.compile(r"[|&;<>()*?]")
# A bash example that runs longer than this has hung (the slowest, `unimm eval` on a few images, takes ~30 s).
BASH_TIMEOUT_S = 600


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


@dataclass
class Example:
    """One fenced code block of a Markdown page."""

    page: Path
    line: int  # 1-based line of the opening fence
    language: str  # one of LANGUAGES' values, or the block's own info word when it is not an example
    code: str
    skip: str | None = None  # the reason, when marked skip
    integration: bool = False

    @property
    def name(self) -> str:
        return f"{_shown(self.page)}:{self.line}-{self.language}"


@dataclass
class Page:
    """The state of one page's examples in this session: its working folder and its python namespace."""

    folder: Path
    module: types.ModuleType  # the examples' globals; in sys.modules, as dataclasses and pickle expect
    done: set[int] = field(default_factory=set)  # lines of the python blocks run so far
    failed: str | None = None  # the first python block that failed, later blocks fail with its name


def parse_examples(page: Path) -> list[Example]:
    """The fenced code blocks of ``page`` with their markers; a malformed or dangling marker is a ``ValueError``."""
    lines = page.read_text(encoding="utf-8").splitlines()
    examples: list[Example] = []
    marker: tuple[int, re.Match] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        if ANY_MARKER.search(line):
            match = MARKER.match(line)
            if match is None or (match["kind"] == "skip" and not match["reason"]):
                raise ValueError(
                    f"{_shown(page)}:{index + 1}: malformed example marker {line.strip()!r}; write "
                    "`<!-- example: skip (REASON) -->` or `<!-- example: integration -->`"
                )
            if marker is not None:
                raise ValueError(f"{_shown(page)}:{marker[0]}: example marker without a code block")
            marker = (index + 1, match)
            index += 1
            continue
        opening = FENCE.match(line)
        if opening is None:
            if line.strip() and marker is not None:
                raise ValueError(f"{_shown(page)}:{marker[0]}: example marker without a code block")
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].strip().lstrip("{").lstrip(".").split()
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not re.match(
            rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]
        ):
            body.append(lines[end][len(indent) :] if lines[end].startswith(indent) else lines[end].lstrip())
            end += 1
        if end == len(lines):
            raise ValueError(f"{_shown(page)}:{index + 1}: code block never closed")
        word = info[0].lower() if info else ""
        example = Example(page, index + 1, LANGUAGES.get(word, word or "text"), "\n".join(body) + "\n")
        if marker is not None:
            if example.language not in ("python", "bash"):
                raise ValueError(f"{example.name}: a marker only applies to python and bash blocks")
            kind, reason = marker[1]["kind"], marker[1]["reason"]
            example.skip = reason.strip() if kind == "skip" else None
            example.integration = kind == "integration"
            marker = None
        examples.append(example)
        index = end + 1
    if marker is not None:
        raise ValueError(f"{_shown(page)}:{marker[0]}: example marker without a code block")
    return examples


def runnable(example: Example) -> bool:
    """Whether ``example`` is run (python and bash blocks not marked skip), rather than parsed or left alone."""
    return example.language in ("python", "bash") and example.skip is None


def collect() -> list[Example]:
    """The examples of every page; the blocks run after an integration block of a page inherit its tier (they
    may build on what it made)."""
    collected = []
    for page in PAGES:
        integration = False
        for example in parse_examples(page):
            if runnable(example):
                integration = integration or example.integration
                example.integration = integration
            if example.language in ("python", "bash", "yaml", "json"):
                collected.append(example)
    return collected


def _params() -> list:
    params = []
    for example in collect():
        marks = [pytest.mark.integration] if example.integration else []
        if example.skip is not None:
            marks.append(pytest.mark.skip(reason=example.skip))
        params.append(pytest.param(example, id=example.name, marks=marks))
    return params


EXAMPLES = _params()


@pytest.fixture(scope="session")
def pages() -> dict[Path, Page]:
    """One :class:`Page` per Markdown file, made on first use."""
    return {}


def page_state(pages: dict[Path, Page], page: Path, tmp_path_factory: pytest.TempPathFactory) -> Page:
    if page not in pages:
        import unimm

        folder = tmp_path_factory.mktemp(page.stem)
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "demo").symlink_to(Path(unimm.__file__).parent / "demo_checkpoint")
        (folder / "recipes").symlink_to(REPO / "recipes")
        shutil.copy(DOCS / "assets" / "shoe.png", folder / "shoe.png")
        module = types.ModuleType(f"docs_example_{len(pages)}_{page.stem}")
        sys.modules[module.__name__] = module
        pages[page] = Page(folder, module)
    return pages[page]


def run_page_until(
    example: Example, state: Page, clean_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run ``example`` in its page's folder, after the earlier runnable blocks of its page that have not run yet
    (in order, as a reader would): a block may use what an earlier one defined or wrote."""
    monkeypatch.chdir(state.folder)
    earlier = [
        other for other in parse_examples(example.page) if runnable(other) and other.line < example.line
    ]
    for block in [*earlier, example]:
        if block.line in state.done:
            continue
        if state.failed is not None:
            pytest.fail(f"an earlier example of this page failed: {state.failed}")
        try:
            if block.language == "python":
                exec(compile(block.code, block.name, "exec"), state.module.__dict__)
            else:
                run_bash(block, state, clean_env)
        except BaseException:
            state.failed = block.name
            raise
        state.done.add(block.line)


def needs_bash(line: str) -> bool:
    """Whether a command line uses shell syntax outside its quotes: pipes, redirections, lists, subshells, globs,
    or variables and command substitution (which double quotes expand too)."""
    code = line.split(" #", 1)[0]
    unquoted_single = re.sub(r"'[^']*'", "", code)
    unquoted = re.sub(r'"[^"]*"', "", unquoted_single)
    return bool(re.search(r"[$`]", unquoted_single) or SHELL_SYNTAX.search(unquoted))


def unimm_commands(code: str) -> list[list[str]] | None:
    """The argument lists of a block made only of plain ``unimm ARGS`` commands (comments and line continuations
    allowed), else ``None`` (pipes, redirections, variables, other programs: a job for bash)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] != "unimm" or needs_bash(line):
            return None
        commands.append(words[1:])
    return commands


def run_bash(example: Example, state: Page, clean_env: dict[str, str]) -> None:
    """Plain ``unimm`` commands run in this process (whose working folder is the page's) through
    ``unimm.cli.main``, the console script's entry point, without a new interpreter importing torch for each;
    any other block runs in bash."""
    commands = unimm_commands(example.code)
    if commands is not None:
        from unimm.cli import main

        for argv in commands:
            try:
                status = main(argv)
            except SystemExit as exit_:  # argparse: --help exits 0, a bad option 2
                status = exit_.code or 0
            assert status == 0, f"{example.name}: `unimm {shlex.join(argv)}` returned {status}"
        return
    env = {**clean_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{clean_env.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", example.code],
        cwd=state.folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=BASH_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{example.name} exited with {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
        f"\n--- stderr\n{result.stderr[-4000:]}"
    )


@pytest.mark.timeout(BASH_TIMEOUT_S)
@pytest.mark.parametrize("example", EXAMPLES)
def test_example(
    example: Example,
    pages: dict[Path, Page],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    clean_env: dict[str, str],
) -> None:
    if example.language == "yaml":
        assert list(yaml.safe_load_all(example.code)), f"{example.name} is empty"
        return
    if example.language == "json":
        json.loads(example.code)
        return
    run_page_until(example, page_state(pages, example.page, tmp_path_factory), clean_env, monkeypatch)


def test_the_pages_have_examples_and_well_formed_markers() -> None:
    """Markers parse (collection would have failed otherwise), and each page's examples are counted."""
    examples = collect()
    pages_with_examples = {example.page for example in examples}
    assert REPO / "README.md" in pages_with_examples
    assert DOCS / "quickstart.md" in pages_with_examples
    readme_python = [e for e in examples if e.page == REPO / "README.md" and e.language == "python"]
    assert readme_python and readme_python[0].skip is None, "the README's first python example must run"
    assert all(example.skip for example in examples if example.skip is not None)


def test_parser_reads_markers_indentation_and_rejects_dangling_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n<!-- example: skip (needs a GPU) -->\n```python\nx = 1\n```\n\n"
        '=== "Tab"\n\n    <!-- example: integration -->\n    ```bash\n    echo hi\n    ```\n\n```\nplain\n```\n'
    )
    first, second, third = parse_examples(page)
    assert (first.language, first.skip, first.code) == ("python", "needs a GPU", "x = 1\n")
    assert (second.language, second.integration, second.code) == ("bash", True, "echo hi\n")
    assert third.language == "text"
    page.write_text("<!-- example: skip (why) -->\n\nsome text\n")
    with pytest.raises(ValueError, match="marker without a code block"):
        parse_examples(page)
    page.write_text("<!-- example: skip -->\n```python\n```\n")
    with pytest.raises(ValueError, match="malformed example marker"):
        parse_examples(page)
