"""The pipeline commands (chat, generate, reconstruct, demo) run in-process on a tiny random checkpoint."""

import argparse
import io
import logging

import PIL.Image
import pytest

from unimm import cli
from unimm.pipelines.testing import build_random_pipeline

PIPELINE_COMMANDS = ("chat", "generate", "reconstruct", "demo")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("commands") / "tiny"
    build_random_pipeline("tiny").save_pretrained(folder)
    return str(folder)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "square.png"
    PIL.Image.new("RGB", (24, 24), (40, 160, 90)).save(path)
    return str(path)


@pytest.mark.parametrize("command", PIPELINE_COMMANDS)
def test_help_describes_every_option(command, capsys):
    parser = cli.build_parser()
    subparser = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ).choices[command]
    undocumented = [action.dest for action in subparser._actions if not action.help]
    assert undocumented == []
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in subparser._actions:
        assert all(option in text for option in action.option_strings)


@pytest.mark.integration
def test_chat_one_shot_with_an_image(checkpoint, image_file, capsys):
    status = cli.main(
        [
            "chat",
            "--checkpoint",
            checkpoint,
            "--prompt",
            "what is this ?",
            "--image",
            image_file,
            "--max-new-tokens",
            "4",
        ]
    )
    assert status == 0
    assert capsys.readouterr().out.strip()  # the (untrained) answer, streamed


@pytest.mark.integration
def test_chat_conversation_from_the_terminal(checkpoint, image_file, capsys, monkeypatch):
    lines = f"/image {image_file}\nwhat is this ?\n/image nowhere.png\nshow me\n/reset\nplease\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert cli.main(["chat", "--checkpoint", checkpoint, "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant> ") == 3
    assert "no image file at 'nowhere.png'" in captured.err


@pytest.mark.integration
def test_generate_writes_pngs_and_a_grid(checkpoint, tmp_path, capsys):
    output_dir = tmp_path / "generated"
    arguments = ["generate", "--checkpoint", checkpoint, "--prompt", "a cat", "--prompt", "a bag"]
    arguments += ["--num-images-per-prompt", "2", "--height", "16", "--width", "24", "--steps", "2"]
    assert cli.main([*arguments, "--output-dir", str(output_dir)]) == 0
    written = sorted(path.name for path in output_dir.iterdir())
    assert written == ["00-00.png", "00-01.png", "01-00.png", "01-01.png", "grid.png"]
    assert PIL.Image.open(output_dir / "00-00.png").size == (24, 16)
    assert "4 images" in capsys.readouterr().out


@pytest.mark.integration
def test_reconstruct_writes_images_and_reports_psnr(checkpoint, image_file, tmp_path, capsys):
    output_dir = tmp_path / "reconstructed"
    arguments = ["reconstruct", image_file, "--checkpoint", checkpoint, "--decoder", "pixel"]
    assert cli.main([*arguments, "--output-dir", str(output_dir)]) == 0
    assert (output_dir / "square-reconstruction.png").is_file() and (output_dir / "grid.png").is_file()
    assert "PSNR" in capsys.readouterr().out


@pytest.mark.integration
def test_demo_shows_every_scene_in_one_picture_and_a_transcript(checkpoint, tmp_path, capsys):
    from unimm.commands.demo import DEMO_SCENES, PICTURE_NAME
    from unimm.commands.labelled_picture import PAGE_MAX_WIDTH

    output_dir = tmp_path / "demo"
    arguments = ["demo", "--checkpoint", checkpoint, "--output-dir", str(output_dir), "--num-images", "2"]
    arguments += ["--num-prompts", "1", "--num-images-per-prompt", "2", "--decoder", "pixel"]
    assert cli.main(arguments) == 0
    out = capsys.readouterr().out
    assert all(f"== {scene.title} ==" in out for scene in DEMO_SCENES)  # no scene left out
    # 2 + 2 questions, 1 + 1 drawings, 2 conversations of 3 turns, 2 interleaved, 4 edits, 3 wide or tall.
    assert out.count("\n  you: ") == 4 + 2 + 6 + 2 + 4 + 3
    assert out.count("\n  model: ") == out.count("\n  you: ")
    assert "<2 images" in out and "pixel decoder" in out
    assert sorted(path.name for path in output_dir.iterdir()) == [PICTURE_NAME]
    assert PIL.Image.open(output_dir / PICTURE_NAME).width <= PAGE_MAX_WIDTH


@pytest.mark.integration
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["generate", "--prompt", "a cat", "--height", "18"], "height=18 is off the grid"),
        (["chat", "--prompt", "what ?", "--image", "missing.png"], "no image file at 'missing.png'"),
        (["reconstruct", "missing.png"], "no image file at 'missing.png'"),
    ],
)
def test_bad_input_is_one_logged_line(checkpoint, arguments, message, caplog):
    with caplog.at_level(logging.ERROR):
        assert cli.main([*arguments, "--checkpoint", checkpoint]) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]


def test_missing_checkpoint_is_one_logged_line(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert cli.main(["generate", "--prompt", "a cat", "--checkpoint", str(tmp_path / "none")]) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("no checkpoint folder at")


def test_grid_captions_wrap_instead_of_losing_their_end():
    from unimm.commands.pipeline_arguments import _caption_lines

    # "a pair of trouse" was all a 96-pixel cell showed of the demo's caption.
    assert _caption_lines("a photo of a pair of trousers", 96) == "a photo of a\npair of trousers"
    assert _caption_lines("a red circle", 96) == "a red circle"
    assert _caption_lines("one two three four five six seven eight", 48) == "one two\nthree…"
