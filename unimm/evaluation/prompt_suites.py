"""The field's text-to-image prompt suites: read their prompt files, write images where their scorers look.

Two suites, each in exactly the layout its official scorer reads (the scorers run on a GPU machine; see their
repositories):

- **GenEval** (`djghosh13/geneval`): prompts from ``evaluation_metadata.jsonl``, one JSON object per line
  (``"prompt"``, ``"tag"``, ``"include"``, ...). Line *N* (from 0) becomes the folder ``<output>/<NNNNN>/``
  holding ``metadata.jsonl`` (that line, copied as it is) and ``samples/0000.png``, ``0001.png``, ...;
  ``evaluation/evaluate_images.py <output>`` scores it.
- **DPG-Bench** (`TencentQQGYLab/ELLA`, ``dpg_bench/``): one ``.txt`` file per prompt in a folder; the file
  name without ``.txt`` is the item id of ``dpg_bench.csv``. Each prompt's n images (at most 4) become one
  image ``<output>/<item id>.png``, a grid two images wide, read cell by cell (top-left, top-right,
  bottom-left, bottom-right) by ``compute_dpg_bench.py --image-root-path <output> --resolution R
  --pic-num n``, R the side of one image.

Prompt *i* of the suite (its line, or its place among the sorted prompt files) is drawn with the seed
``seed + i``: its images are the same whatever the batch it is generated in (``generate_images`` with one
seed per prompt), so a run continued with ``resume=True`` finishes as an uninterrupted one would. The seeds
and settings are written to ``<output>/unimm_generation.json`` and each PNG carries its prompt and seed as
text chunks. (DPG-Bench's scorer lists every file of its folder: it reports the JSON file as one "Failed
filename" and goes on, as it does for the result files it writes there itself.)
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
from PIL.PngImagePlugin import PngInfo

from unimm.llm.sampling import default_image_sampling

if TYPE_CHECKING:
    from unimm.pipelines import UniMMPipeline

logger = logging.getLogger(__name__)

GENEVAL = "geneval"
DPG_BENCH = "dpg_bench"
SUITES = (GENEVAL, DPG_BENCH)
RECORD_FILE = "unimm_generation.json"
GENEVAL_METADATA_FILE = "metadata.jsonl"
GENEVAL_SAMPLES = "samples"
GENEVAL_FOLDER_DIGITS = 5  # <output>/00000/, as GenEval's generation script and README write them
GENEVAL_SAMPLE_DIGITS = 4  # samples/0000.png, as GenEval's README shows (its scorer takes any \d+.png)
DPG_PROMPT_SUFFIX = ".txt"
DPG_GRID_COLUMNS = 2  # compute_dpg_bench.py crops (0,0,R,R), (R,0,2R,R), (0,R,R,2R), (R,R,2R,2R)
DPG_MAX_IMAGES = 4  # ... so --pic-num is at most 4
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of a suite.

    Attributes:
        key: where its images go: GenEval's 5-digit folder name, DPG-Bench's item id (the prompt file's name).
        prompt: the text drawn.
        metadata_line: GenEval only: the prompt's line of ``evaluation_metadata.jsonl``, copied to the
            folder's ``metadata.jsonl`` as it is (the scorer reads its ``tag``, ``include`` and ``exclude``).
    """

    key: str
    prompt: str
    metadata_line: str | None = None


@dataclass
class PromptSuiteRun:
    """What :func:`generate_prompt_suite` did.

    Attributes:
        suite: ``"geneval"`` or ``"dpg_bench"``.
        output_dir: the folder to give the suite's scorer.
        generated: prompts drawn by this call.
        skipped: prompts found complete from an earlier run (``resume=True``).
        num_images_per_prompt: images of each prompt (DPG-Bench: the scorer's ``--pic-num``).
        image_size: ``(width, height)`` of one generated image (DPG-Bench: the scorer's ``--resolution`` is the
            side); ``None`` when every prompt was skipped.
    """

    suite: str
    output_dir: Path
    generated: int
    skipped: int
    num_images_per_prompt: int
    image_size: tuple[int, int] | None

    def scorer_hint(self) -> str:
        """The official scorer's command line for this folder."""
        if self.suite == GENEVAL:
            return (
                f'python evaluation/evaluate_images.py "{self.output_dir}" --outfile results.jsonl '
                '--model-path "<OBJECT_DETECTOR_FOLDER>"  (in a clone of djghosh13/geneval)'
            )
        resolution = self.image_size[0] if self.image_size else "<R>"
        return (
            f'bash dpg_bench/dist_eval.sh "{self.output_dir}" {resolution}  with PIC_NUM={self.num_images_per_prompt} '
            "(in a clone of TencentQQGYLab/ELLA)"
        )


# --- reading the prompt files ---------------------------------------------------------------------------


def read_geneval_prompts(path: str | os.PathLike) -> list[SuitePrompt]:
    """The prompts of a GenEval ``evaluation_metadata.jsonl`` (blank lines are skipped; the others are
    numbered from 0 in order, as GenEval's generation script numbers its output folders)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata: no file at {str(path)!r}; pass evaluation_metadata.jsonl")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            metadata = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a JSON object ({error.msg})") from None
        if not isinstance(metadata, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
        for field in ("prompt", "tag"):  # the scorer reads both
            if not isinstance(metadata.get(field), str) or not metadata[field].strip():
                raise ValueError(f"{where}: needs a non-empty string {field!r}, as GenEval's format has")
        key = f"{len(prompts):0{GENEVAL_FOLDER_DIGITS}d}"
        prompts.append(SuitePrompt(key=key, prompt=metadata["prompt"], metadata_line=line.strip()))
    if not prompts:
        raise ValueError(f"GenEval metadata {str(path)!r} holds no prompts")
    return prompts


def read_dpg_bench_prompts(folder: str | os.PathLike) -> list[SuitePrompt]:
    """The prompts of a DPG-Bench prompt folder: one ``<item id>.txt`` per prompt, sorted by item id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"DPG-Bench prompts: no folder at {str(folder)!r}; pass dpg_bench/prompts (one .txt per prompt)"
        )
    files = sorted(path for path in folder.iterdir() if path.suffix == DPG_PROMPT_SUFFIX and path.is_file())
    if not files:
        raise ValueError(f"DPG-Bench prompts: {str(folder)!r} holds no {DPG_PROMPT_SUFFIX} files")
    prompts = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as error:
            raise ValueError(f"DPG-Bench prompt {str(path)!r}: not UTF-8 text ({error.reason})") from None
        if not text:
            raise ValueError(f"DPG-Bench prompt {str(path)!r} is empty")
        prompts.append(SuitePrompt(key=path.stem, prompt=text))
    return prompts


def read_prompt_suite(suite: str, source: str | os.PathLike) -> list[SuitePrompt]:
    """The prompts of ``suite`` (``"geneval"``: the metadata file; ``"dpg_bench"``: the prompt folder)."""
    if suite == GENEVAL:
        return read_geneval_prompts(source)
    if suite == DPG_BENCH:
        return read_dpg_bench_prompts(source)
    raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")


# --- writing the scorers' layouts -----------------------------------------------------------------------


def geneval_sample_paths(output_dir: Path, item: SuitePrompt, count: int) -> list[Path]:
    """Where GenEval's scorer finds the ``count`` images of ``item``."""
    samples = output_dir / item.key / GENEVAL_SAMPLES
    return [samples / f"{index:0{GENEVAL_SAMPLE_DIGITS}d}.png" for index in range(count)]


def dpg_bench_image_path(output_dir: Path, item: SuitePrompt) -> Path:
    """Where DPG-Bench's scorer finds the grid of ``item`` (its file name is the item id)."""
    return output_dir / f"{item.key}.png"


def write_geneval_prompt(
    output_dir: Path, item: SuitePrompt, images: Sequence[PIL.Image.Image], seed: int
) -> None:
    """``<output>/<key>/metadata.jsonl`` and ``samples/<NNNN>.png`` for one prompt."""
    folder = output_dir / item.key
    (folder / GENEVAL_SAMPLES).mkdir(parents=True, exist_ok=True)
    (folder / GENEVAL_METADATA_FILE).write_text(item.metadata_line + "\n", encoding="utf-8")
    for index, (image, path) in enumerate(zip(images, geneval_sample_paths(output_dir, item, len(images)))):
        _save_png(image, path, item.prompt, seed, index)


def write_dpg_bench_prompt(
    output_dir: Path, item: SuitePrompt, images: Sequence[PIL.Image.Image], seed: int
) -> None:
    """``<output>/<item id>.png``: the prompt's images in a grid two wide (one image alone stays as it is)."""
    width, height = images[0].size
    columns = min(len(images), DPG_GRID_COLUMNS)
    rows = math.ceil(len(images) / DPG_GRID_COLUMNS)
    grid = PIL.Image.new("RGB", (columns * width, rows * height), "black")
    for index, image in enumerate(images):
        row, column = divmod(index, DPG_GRID_COLUMNS)
        grid.paste(image.convert("RGB"), (column * width, row * height))
    output_dir.mkdir(parents=True, exist_ok=True)
    _save_png(grid, dpg_bench_image_path(output_dir, item), item.prompt, seed, None)


def _save_png(image: PIL.Image.Image, path: Path, prompt: str, seed: int, index: int | None) -> None:
    """Save a PNG whose text chunks say how it was drawn, through a temporary file so that an interrupted
    run never leaves a truncated image that ``resume`` would take for a finished one."""
    info = PngInfo()
    info.add_itxt("prompt", prompt)
    info.add_text("seed", str(seed))
    if index is not None:
        info.add_text("image_index", str(index))
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG", pnginfo=info)
    os.replace(partial, path)


def _is_complete(suite: str, output_dir: Path, item: SuitePrompt, count: int) -> bool:
    if suite == GENEVAL:
        paths = [
            output_dir / item.key / GENEVAL_METADATA_FILE,
            *geneval_sample_paths(output_dir, item, count),
        ]
        return all(path.is_file() for path in paths)
    return dpg_bench_image_path(output_dir, item).is_file()


# --- generating a suite ---------------------------------------------------------------------------------


def generate_prompt_suite(
    pipeline: UniMMPipeline,
    suite: str,
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_images_per_prompt: int = 4,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    resume: bool = False,
    **generation_options: Any,
) -> PromptSuiteRun:
    """Draw every prompt of a suite and write the images in the layout of its official scorer.

    Args:
        pipeline: the model.
        suite: ``"geneval"`` (``source``: ``evaluation_metadata.jsonl``) or ``"dpg_bench"`` (``source``: the
            folder of prompt files).
        output_dir: the folder to give the scorer.
        num_images_per_prompt: images per prompt (both scorers' default: 4; DPG-Bench takes at most 4).
        batch_size: prompts per ``generate_images`` call (each draws ``batch_size * num_images_per_prompt``
            images at once).
        seed: prompt *i* is drawn with ``seed + i``.
        resume: skip the prompts whose images are all there (a run interrupted, or continued with more
            prompts); the settings must be those of the earlier run, which ``unimm_generation.json`` holds.
        generation_options: passed to :meth:`UniMMPipeline.generate_images` (``guidance_scale``, ``height``,
            ``width``, ``decoder``, ``num_inference_steps``, ``decoder_guidance_scale``, ``image_sampling``).
    """
    # 1. Check the request before anything is drawn.
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
    if suite == DPG_BENCH and num_images_per_prompt > DPG_MAX_IMAGES:
        raise ValueError(
            f"num_images_per_prompt={num_images_per_prompt}: DPG-Bench's scorer reads at most "
            f"{DPG_MAX_IMAGES} images per prompt (a 2x2 grid, --pic-num 1-4)"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if "prompts" in generation_options:
        raise ValueError("generate_prompt_suite sets the prompts itself, from the suite's prompt file")
    if suite == DPG_BENCH:
        grid = pipeline.image_grid(generation_options.get("height"), generation_options.get("width"))
        if grid[0] != grid[1]:
            raise ValueError(
                f"DPG-Bench's scorer crops square images (--resolution): height and width must be equal, "
                f"got a {grid[0]}x{grid[1]} code grid; pass equal height and width"
            )
    items = read_prompt_suite(suite, source)
    output_dir = Path(output_dir)
    if generation_options.get("image_sampling") is None:  # recorded as drawn: the checkpoint's own
        generation_options["image_sampling"] = default_image_sampling(pipeline.llm.generation_config)
    # 2. The record of the run: the settings and each prompt's seed (checked against an earlier run's).
    settings = {
        "suite": suite,
        "source": str(Path(source).resolve()),
        "checkpoint": str(pipeline.name_or_path or ""),
        "num_images_per_prompt": num_images_per_prompt,
        "seed": seed,
        "generation_options": {name: _jsonable(value) for name, value in sorted(generation_options.items())},
    }
    _check_record(output_dir, settings, resume)
    record = {
        **settings,
        "prompts": [
            {"key": item.key, "prompt": item.prompt, "seed": seed + index} for index, item in enumerate(items)
        ],
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RECORD_FILE).write_text(
        json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    # 3. Draw the prompts still to do, batch by batch, each with its own seed.
    todo = [
        index
        for index, item in enumerate(items)
        if not (resume and _is_complete(suite, output_dir, item, num_images_per_prompt))
    ]
    write = write_geneval_prompt if suite == GENEVAL else write_dpg_bench_prompt
    image_size = None
    for start in range(0, len(todo), batch_size):
        indices = todo[start : start + batch_size]
        output = pipeline.generate_images(
            [items[index].prompt for index in indices],
            num_images_per_prompt=num_images_per_prompt,
            seed=[seed + index for index in indices],
            **generation_options,
        )
        for position, index in enumerate(indices):
            images = output.images[position * num_images_per_prompt : (position + 1) * num_images_per_prompt]
            write(output_dir, items[index], images, seed + index)
        image_size = output.images[0].size
        logger.info("%s: %d/%d prompts drawn", suite, start + len(indices), len(todo))
    return PromptSuiteRun(
        suite=suite,
        output_dir=output_dir,
        generated=len(todo),
        skipped=len(items) - len(todo),
        num_images_per_prompt=num_images_per_prompt,
        image_size=image_size,
    )


def _check_record(output_dir: Path, settings: dict[str, Any], resume: bool) -> None:
    """With ``resume``, an earlier run's record in ``output_dir`` must hold the same settings."""
    path = output_dir / RECORD_FILE
    if not resume or not path.is_file():
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error.msg}); remove it to start the run again") from None
    changed = sorted(name for name, value in settings.items() if earlier.get(name) != value)
    if changed:
        raise ValueError(
            f"resume: {output_dir} was generated with other settings ({', '.join(changed)} differ, see {path}); "
            "use the same settings, another output folder, or no resume to draw everything again"
        )


def _jsonable(value: Any) -> Any:
    """Generation options as they are written to the record (sampling settings are dataclasses)."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(entry) for entry in value]
    return value


__all__ = [
    "DPG_BENCH",
    "GENEVAL",
    "SUITES",
    "PromptSuiteRun",
    "SuitePrompt",
    "generate_prompt_suite",
    "read_dpg_bench_prompts",
    "read_geneval_prompts",
    "read_prompt_suite",
]
