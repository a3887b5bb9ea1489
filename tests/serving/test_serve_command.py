"""`unimm serve`: options, the app it builds from a checkpoint folder, and one-line errors."""

from __future__ import annotations

import argparse
import logging

import pytest
from starlette.testclient import TestClient

from unimm import cli
from unimm.serving import bind_socket


@pytest.fixture(scope="module")
def checkpoint(tiny_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "tiny-model"
    tiny_pipeline.save_pretrained(folder)
    return folder


@pytest.fixture
def served(monkeypatch):
    """Replaces uvicorn: records the app and socket ``unimm serve`` would serve."""
    calls = []
    monkeypatch.setattr("unimm.serving.server.serve", lambda app, sock: calls.append((app, sock)))
    yield calls
    for _, sock in calls:
        sock.close()


def test_help_describes_every_option(capsys):
    parser = cli.build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    serve = subparsers.choices["serve"]
    assert [action.dest for action in serve._actions if not action.help] == []
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--host",
        "--port",
        "--max-batch-size",
        "--batch-wait-ms",
        "--max-queue-size",
        "--max-image-bytes",
    ):
        assert option in text
    assert "127.0.0.1" in text


def test_serve_builds_the_app_of_a_checkpoint_on_localhost(checkpoint, served):
    arguments = [
        "serve",
        str(checkpoint),
        "--port",
        "0",
        "--max-batch-size",
        "8",
        "--decoder",
        "pixel",
        "--no-compile",
    ]
    assert cli.main(arguments) == 0
    ((app, sock),) = served
    assert sock.getsockname()[0] == "127.0.0.1"
    config = app.state.served.config
    assert (config.model_name, config.max_batch_size, config.decoder) == ("tiny-model", 8, "pixel")
    with TestClient(app) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-model"
        answer = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        )
        assert answer.status_code == 200


def test_errors_are_one_line_and_come_before_loading_when_they_can(checkpoint, tmp_path, served, caplog):
    taken = bind_socket("127.0.0.1", 0)
    port = str(taken.getsockname()[1])
    taken.listen()
    with caplog.at_level(logging.ERROR):
        assert cli.main(["serve", str(checkpoint), "--port", port, "--no-compile"]) == 1
        assert cli.main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 1
        assert cli.main(["serve", str(checkpoint), "--port", "0", "--max-batch-size", "0"]) == 1
    taken.close()
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert f"cannot listen on 127.0.0.1:{port}" in messages[0]
    assert "missing" in messages[1]
    assert "max_batch_size must be at least 1" in messages[2]
    assert all("\n" not in message for message in messages)
    assert served == []
