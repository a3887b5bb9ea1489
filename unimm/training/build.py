"""Multi-step recipes: a model built by a list of steps, each one ``unimm`` command, skipped once done.

A build recipe (YAML) names a working folder and its steps, in order::

    work_dir: outputs/shapes
    steps:
      - name: tokenizer
        command: train                        # a unimm subcommand (`unimm train ...`)
        recipe: tokenizer.yaml                # relative to this file's folder
        args: ["output_dir=${work_dir}/tokenizer"]
        output: ${work_dir}/tokenizer/export  # the step is done when this exists
      - name: llm
        command: train
        recipe: llm.yaml
        launcher: [torchrun, --nproc_per_node, "2"]   # optional: the command under a launcher
        output: ${work_dir}/llm/export
        group: train                          # consecutive steps of one group run at the same time
      - name: detokenizer
        ...
        group: train

Each step runs as its own process (``python -m unimm.cli COMMAND [RECIPE] ARGS``, ``python -m MODULE ARGS``
with ``module:``, or ``python SCRIPT ARGS`` with ``script:``, a file next to the recipe), its output goes to ``${work_dir}/logs/NAME.log``, and ``${work_dir}/build.json``
records what ran, how long it took and how it ended. Every unimm step writes its output atomically, so an
existing ``output`` means a finished step: a rerun resumes at the first unfinished one (and the training
steps themselves resume from their last checkpoint). ``${work_dir}`` and ``${recipe_dir}`` are replaced in
every string.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

STATUS_FILE = "build.json"
LOG_FOLDER = "logs"
STEP_KEYS = (
    "name",
    "command",
    "module",
    "script",
    "recipe",
    "args",
    "output",
    "launcher",
    "group",
    "threads",
)
RUNNERS = ("command", "module", "script")
STOP_SECONDS = 30  # how long an interrupted build waits for its steps to end before killing them  # what a step runs: exactly one of them
RECIPE_KEYS = ("work_dir", "steps")


class BuildError(RuntimeError):
    """A build recipe that cannot run, or a step that failed (the message names the step and its log)."""


@dataclass
class BuildStep:
    """One step: a unimm ``command`` (or a Python ``module``) with its recipe and arguments."""

    name: str
    output: str
    command: str | None = None
    module: str | None = None
    script: str | None = None  # a Python file, relative to the build recipe's folder
    recipe: str | None = None
    args: list[str] = field(default_factory=list)
    launcher: list[str] = field(default_factory=list)
    group: str | None = None
    threads: int | None = None  # OMP_NUM_THREADS of the step's process (steps that share the cores)

    def argv(self) -> list[str]:
        """The step's command line."""
        if self.command:
            target = ["-m", "unimm.cli", self.command]
        else:
            target = ["-m", self.module] if self.module else [self.script]
        # A launcher (torchrun, deepspeed) starts Python itself and takes the module after `-m`.
        program = [_executable(self.launcher[0]), *self.launcher[1:]] if self.launcher else [sys.executable]
        recipe = [self.recipe] if self.recipe else []
        return [*program, *target, *recipe, *self.args]


def _executable(name: str) -> str:
    """``name`` on the PATH, else next to this Python (a virtual environment's ``torchrun`` is there even
    when the environment is not activated)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise BuildError(f"launcher {name!r} not found on the PATH nor next to {sys.executable}")
    return found


@dataclass
class BuildRecipe:
    work_dir: Path
    steps: list[BuildStep]
    source: str

    def select(self, names: Sequence[str] | None) -> list[BuildStep]:
        """The steps named (all when ``names`` is empty), in the recipe's order."""
        if not names:
            return list(self.steps)
        known = {step.name for step in self.steps}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise BuildError(f"{self.source}: no step named {unknown}; the steps are {sorted(known)}")
        return [step for step in self.steps if step.name in names]


def load_build_recipe(path: str | os.PathLike, work_dir: str | None = None) -> BuildRecipe:
    """Read and check a build recipe; ``work_dir`` replaces the recipe's own."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"build recipe {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text())
    source = str(path)
    if not isinstance(values, dict) or not isinstance(values.get("steps"), list) or not values["steps"]:
        raise BuildError(f"{source}: expected a mapping with `work_dir` and a non-empty list of `steps`")
    extra = sorted(set(values) - set(RECIPE_KEYS))
    if extra:
        raise BuildError(f"{source}: unknown key(s) {extra}; a build recipe has {list(RECIPE_KEYS)}")
    work = work_dir or values.get("work_dir")
    if not work:
        raise BuildError(f"{source}: `work_dir` is missing (or pass --work-dir)")
    recipe_dir = str(path.parent.resolve())
    work = _substitute(str(work), {"recipe_dir": recipe_dir})
    variables = {"work_dir": work, "recipe_dir": recipe_dir}
    steps = [
        _parse_step(step, index, variables, path.parent.resolve(), source)
        for index, step in enumerate(values["steps"])
    ]
    names = [step.name for step in steps]
    if len(set(names)) != len(names):
        raise BuildError(f"{source}: step names must be unique, got {names}")
    return BuildRecipe(work_dir=Path(work), steps=steps, source=source)


def _parse_step(
    values: Any, index: int, variables: Mapping[str, str], recipe_dir: Path, source: str
) -> BuildStep:
    where = f"{source}: steps[{index}]"
    if not isinstance(values, dict):
        raise BuildError(f"{where}: expected a mapping, got {type(values).__name__}")
    extra = sorted(set(values) - set(STEP_KEYS))
    if extra:
        raise BuildError(f"{where}: unknown key(s) {extra}; a step has {list(STEP_KEYS)}")
    for key in ("name", "output"):
        if not isinstance(values.get(key), str) or not values[key]:
            raise BuildError(f"{where}: `{key}` is required (a string)")
    if sum(values.get(key) is not None for key in RUNNERS) != 1:
        raise BuildError(
            f"{where} ({values['name']}): give exactly one of `command` (unimm), `module`, `script`"
        )
    for key in ("args", "launcher"):
        if not isinstance(values.get(key, []), list):
            raise BuildError(f"{where} ({values['name']}): `{key}` must be a list of strings")
    step = BuildStep(**{key: _substitute(value, variables) for key, value in values.items()})
    for key in ("recipe", "script"):  # files of the build, next to its recipe
        value = getattr(step, key)
        if value is None:
            continue
        path = Path(value) if Path(value).is_absolute() else recipe_dir / value
        if not path.is_file():
            raise BuildError(f"{where} ({step.name}): {key} {path} does not exist")
        setattr(step, key, str(path))
    return step


def _substitute(value: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for name, replacement in variables.items():
            value = value.replace(f"${{{name}}}", replacement)
        return value
    if isinstance(value, list):
        return [_substitute(item, variables) for item in value]
    return value


def run_build(
    recipe: BuildRecipe, names: Sequence[str] | None = None, force: bool = False, dry_run: bool = False
) -> dict[str, dict[str, Any]]:
    """Run the recipe's steps (``names``, default all) in order, skipping those whose output exists
    (unless ``force``); consecutive steps of one ``group`` run at the same time. Returns, and writes to
    ``work_dir/build.json``, each step's status ("done already", "ran", "failed") and seconds."""
    status = _read_status(recipe.work_dir)
    for _, batch in groupby(recipe.select(names), key=lambda step: step.group or step.name):
        todo = []
        for step in batch:
            if Path(step.output).exists() and not force:
                logger.info("step %s: done already (%s)", step.name, step.output)
                status[step.name] = {**status.get(step.name, {}), "status": "done already"}
            else:
                todo.append(step)
        if dry_run:
            for step in todo:
                logger.info("step %s would run: %s", step.name, " ".join(step.argv()))
            continue
        if todo:
            status.update(_run_together(todo, recipe.work_dir))
            _write_status(recipe.work_dir, status)
            failed = [step.name for step in todo if status[step.name]["status"] == "failed"]
            if failed:
                logs = ", ".join(status[name]["log"] for name in failed)
                raise BuildError(f"step(s) {failed} of {recipe.source} failed: see {logs}")
    if not dry_run:
        _write_status(recipe.work_dir, status)
    return status


def _run_together(steps: list[BuildStep], work_dir: Path) -> dict[str, dict[str, Any]]:
    """Start every step, wait for all; each step's status, seconds, command and log. Interrupted (Ctrl-C,
    SIGTERM, an error), the build stops the steps it started: none keeps writing into its folder unseen."""
    commands = {step.name: step.argv() for step in steps}  # a missing launcher fails before anything starts
    started, processes, results = time.time(), {}, {}
    try:
        for step in steps:
            log = work_dir / LOG_FOLDER / f"{step.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            environment = dict(os.environ)
            if step.threads is not None:
                environment["OMP_NUM_THREADS"] = str(step.threads)
            logger.info("step %s: %s (log: %s)", step.name, " ".join(commands[step.name]), log)
            with open(log, "w") as handle:
                process = subprocess.Popen(
                    commands[step.name], stdout=handle, stderr=subprocess.STDOUT, env=environment
                )
            processes[step.name] = (process, log, step)
        for name, (process, log, step) in processes.items():
            code = process.wait()
            results[name] = _result(step, code, time.time() - started, commands[name], log)
    except BaseException:
        _stop([process for process, _, _ in processes.values()])
        raise
    return results


def _result(step: BuildStep, code: int, seconds: float, command: list[str], log: Path) -> dict[str, Any]:
    ok = code == 0 and Path(step.output).exists()
    if code == 0 and not ok:
        logger.error("step %s exited 0 but did not write its output %s", step.name, step.output)
    status = "ran" if ok else "failed"
    logger.info("step %s: %s in %.1f min", step.name, status, seconds / 60)
    return {
        "status": status,
        "seconds": round(seconds, 1),
        "exit_code": code,
        "command": command,
        "log": str(log),
    }


def _stop(processes: list[subprocess.Popen]) -> None:
    """Terminate the steps still running (a training step keeps its last checkpoint), then kill stragglers."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        logger.warning("stopping step process %d", process.pid)
        process.terminate()
    for process in running:
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read_status(work_dir: Path) -> dict[str, dict[str, Any]]:
    path = work_dir / STATUS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is not JSON (an interrupted write?): starting a new record", path)
        return {}


def _write_status(work_dir: Path, status: Mapping[str, Any]) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    temporary = work_dir / f".{STATUS_FILE}.tmp"
    temporary.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(temporary, work_dir / STATUS_FILE)
