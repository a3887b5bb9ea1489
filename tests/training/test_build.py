"""`unimm build`: multi-step recipes whose finished steps are skipped, so a rerun resumes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from unimm.cli import main as unimm_main
from unimm.training.build import BuildError, load_build_recipe, run_build


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """Two steps (``python -m json.tool IN OUT`` copies JSON): the second reads what the first wrote."""
    _write(tmp_path / "input.json", '{"a": 1}')
    return _write(
        tmp_path / "build.yaml",
        """\
        work_dir: ${recipe_dir}/work
        steps:
          - name: first
            module: json.tool
            args: ["${recipe_dir}/input.json", "${work_dir}/first.json"]
            output: ${work_dir}/first.json
          - name: second
            module: json.tool
            args: ["${work_dir}/first.json", "${work_dir}/second.json"]
            output: ${work_dir}/second.json
        """,
    )


def test_steps_run_in_order_and_a_rerun_skips_finished_ones(chain: Path):
    (chain.parent / "work").mkdir()
    recipe = load_build_recipe(chain)
    status = run_build(recipe)
    assert [status[name]["status"] for name in ("first", "second")] == ["ran", "ran"]
    assert json.loads((recipe.work_dir / "second.json").read_text()) == {"a": 1}
    assert json.loads((recipe.work_dir / "build.json").read_text())["second"]["exit_code"] == 0
    assert (recipe.work_dir / "logs" / "first.log").is_file()
    # A rerun does nothing; --force with --steps redoes only the named step.
    second_written = (recipe.work_dir / "second.json").stat().st_mtime_ns
    status = run_build(recipe)
    assert {entry["status"] for entry in status.values()} == {"done already"}
    (recipe.work_dir / "first.json").write_text('{"a": 2}')
    status = run_build(recipe, ["second"], force=True)
    assert status["second"]["status"] == "ran" and status["first"]["status"] == "done already"
    assert json.loads((recipe.work_dir / "second.json").read_text()) == {"a": 2}
    assert (recipe.work_dir / "second.json").stat().st_mtime_ns != second_written


def test_a_failed_step_stops_the_build_and_a_rerun_resumes_there(chain: Path):
    (chain.parent / "input.json").unlink()
    recipe = load_build_recipe(chain)
    with pytest.raises(BuildError, match=r"step\(s\) \['first'\] .* failed: see .*first\.log"):
        run_build(recipe)
    assert not (recipe.work_dir / "second.json").exists()  # never started
    assert json.loads((recipe.work_dir / "build.json").read_text())["first"]["status"] == "failed"
    (chain.parent / "input.json").write_text('{"b": 3}')
    status = run_build(recipe)
    assert status["first"]["status"] == status["second"]["status"] == "ran"


def test_a_group_runs_together_and_the_command_line(chain: Path, tmp_path: Path):
    text = chain.read_text().replace(
        "output: ${work_dir}/first.json", "output: ${work_dir}/first.json\n    group: g"
    )
    text = text.replace('args: ["${work_dir}/first.json"', 'args: ["${recipe_dir}/input.json"')
    text = text.replace("output: ${work_dir}/second.json", "output: ${work_dir}/second.json\n    group: g")
    _write(chain, text)
    (tmp_path / "elsewhere").mkdir()
    # The command: --dry-run runs nothing; --work-dir replaces the recipe's.
    assert unimm_main(["build", str(chain), "--work-dir", str(tmp_path / "elsewhere"), "--dry-run"]) == 0
    assert not (tmp_path / "elsewhere" / "first.json").exists()
    assert unimm_main(["build", str(chain), "--work-dir", str(tmp_path / "elsewhere")]) == 0
    status = json.loads((tmp_path / "elsewhere" / "build.json").read_text())
    assert status["first"]["status"] == status["second"]["status"] == "ran"
    assert unimm_main(["build", str(tmp_path / "missing.yaml")]) == 1  # one line, exit status 1


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("- {name: a, module: json.tool}", "`output` is required"),
        ("- {name: a, output: x}", "exactly one of `command`"),
        ("- {name: a, output: x, command: train, module: m}", "exactly one of `command`"),
        ("- {name: a, output: x, command: train, recipe: nope.yaml}", "nope.yaml does not exist"),
        ("- {name: a, output: x, module: m, colour: red}", r"unknown key\(s\) \['colour'\]"),
        ("- {name: a, output: x, module: m}\n  - {name: a, output: y, module: m}", "unique"),
        ("[]", "non-empty list of `steps`"),
    ],
)
def test_recipe_errors_name_the_step_and_the_problem(tmp_path: Path, steps: str, message: str):
    path = _write(tmp_path / "bad.yaml", f"work_dir: out\nsteps:\n  {steps}\n")
    with pytest.raises(BuildError, match=message):
        load_build_recipe(path)


def test_unknown_step_names_are_refused(chain: Path):
    with pytest.raises(BuildError, match=r"no step named \['third'\]"):
        run_build(load_build_recipe(chain), ["third"])


def test_a_terminated_build_stops_the_steps_it_started(tmp_path: Path):
    import os
    import signal
    import subprocess
    import sys
    import time

    # A step that records its pid and would run for a minute.
    _write(
        tmp_path / "slow.py",
        "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)\n",
    )
    recipe = _write(
        tmp_path / "build.yaml",
        f"""\
        work_dir: {tmp_path / "work"}
        steps:
          - name: slow
            script: slow.py
            args: ["{tmp_path / "pid"}"]
            output: {tmp_path / "never"}
        """,
    )
    build = subprocess.Popen([sys.executable, "-m", "unimm.cli", "build", str(recipe)])
    deadline = time.time() + 60
    while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
        assert time.time() < deadline and build.poll() is None, "the step never started"
        time.sleep(0.2)
    step = int((tmp_path / "pid").read_text())
    build.send_signal(signal.SIGTERM)
    assert build.wait(timeout=60) != 0
    with pytest.raises(ProcessLookupError):  # the step is gone (and reaped), not orphaned
        for _ in range(50):
            os.kill(step, 0)
            time.sleep(0.1)
