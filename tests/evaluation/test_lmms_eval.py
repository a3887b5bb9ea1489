"""The lmms-eval adapter: unimm registered as an lmms-eval model, answering lmms-eval's own ``Instance`` requests
through ``UniMMPipeline.chat`` in batches, and a local YAML task (a dataset of coloured squares written here)
run end to end by lmms-eval's evaluator on a tiny random checkpoint.

lmms-eval requires torchvision and its own torch, which must not replace this machine's CPU torch: these tests
run where it is installed ``--no-deps`` with the few packages its evaluator imports (see
unimm/evaluation/lmms_eval.py), and skip, saying so, where it is not. The entry-point declaration is checked
in any case."""

from __future__ import annotations

import configparser
import textwrap
from pathlib import Path

import pytest

from unimm.pipelines.testing import build_random_pipeline

ENTRY_POINT_GROUP = "lmms_eval.models"
ENTRY_POINT = "unimm = unimm.evaluation.lmms_eval:model_manifest"
SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"
COLOURS = ["red", "blue", "green", "red", "blue"]
QUESTION = "what is this ?"


@pytest.fixture(scope="module")
def adapter_module():
    pytest.importorskip(
        "lmms_eval",
        reason="lmms-eval is not installed (pip install --no-deps lmms-eval, then the packages its evaluator "
        "imports: see unimm/evaluation/lmms_eval.py)",
    )
    from unimm.evaluation import lmms_eval as adapter_module

    return adapter_module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lmms-eval") / "tiny"
    build_random_pipeline("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(adapter_module, checkpoint):
    return adapter_module.UniMMLmms(pretrained=str(checkpoint), batch_size=2)


@pytest.fixture(scope="module")
def squares():
    import PIL.Image

    return [PIL.Image.new("RGB", (16, 16), colour) for colour in COLOURS]


def instance(request_type: str, arguments: tuple, doc_id: int, task: str = "colours"):
    from lmms_eval.api.instance import Instance

    metadata = {"task": task, "doc_id": doc_id, "repeats": 1}
    return Instance(request_type=request_type, arguments=arguments, idx=0, metadata=metadata)


def test_setup_cfg_declares_the_lmms_eval_entry_point():
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    declared = parser.get("options.entry_points", ENTRY_POINT_GROUP, fallback="")
    assert ENTRY_POINT in [line.strip() for line in declared.splitlines()]


def test_manifest_passes_lmms_evals_own_registry_checks(adapter_module):
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(adapter_module.model_manifest())
    assert registry.get_model_class("unimm") is adapter_module.UniMMLmms  # a simple lmms subclass


def test_generate_until_answers_in_batches_as_chat_does(model, squares, monkeypatch):
    docs = [{"image": image} for image in squares]
    model.task_dict = {"colours": {"test": docs}}
    greedy = {"max_new_tokens": 3}
    stopped = {"max_new_tokens": 3, "until": ["image"]}
    requests = [
        (QUESTION, dict(greedy), lambda doc: [doc["image"]], 0),
        ("<image> what is this ?", dict(greedy), lambda doc: [doc["image"]], 1),  # the task placed its image
        ("show me", dict(stopped), lambda doc: [], 2),  # no image
        ("what is it ? please", dict(greedy), lambda doc: [doc["image"]], 3),
        (QUESTION, dict(stopped), lambda doc: [doc["image"]], 4),
    ]
    batch_sizes = []
    chat = model.pipeline.chat
    monkeypatch.setattr(
        model.pipeline,
        "chat",
        lambda messages, **kw: batch_sizes.append(len(messages)) or chat(messages, **kw),
    )
    instances = [
        instance("generate_until", (context, kwargs, visual, doc_id, "colours", "test"), doc_id)
        for context, kwargs, visual, doc_id in requests
    ]
    answers = model.generate_until(instances)
    monkeypatch.undo()
    assert sorted(batch_sizes) == [1, 2, 2]  # 3 greedy requests (2 + 1), 2 with stop strings
    for (context, kwargs, visual, doc_id), answer in zip(requests, answers):
        images = visual(docs[doc_id])
        question = context.replace("<image>", "").strip()
        alone = model.pipeline.chat(question, images=images or None, max_new_tokens=3).text
        expected = alone.split("image")[0] if "until" in kwargs else alone
        assert answer == expected


def test_sampled_answers_do_not_depend_on_the_batch(model, squares):
    model.task_dict = {"colours": {"test": [{"image": image} for image in squares]}}
    sampled = {"max_new_tokens": 4, "temperature": 1.0, "do_sample": True}

    def request(doc_id):
        return instance(
            "generate_until",
            (QUESTION, dict(sampled), lambda doc: [doc["image"]], doc_id, "colours", "test"),
            doc_id,
        )

    together = model.generate_until([request(doc_id) for doc_id in range(4)])
    assert model.generate_until([request(2)]) == [together[2]]  # doc 2 samples with seed + 2 in any batch


def test_loglikelihood_is_lmms_evals_loss_and_greedy_flag(adapter_module, model, squares):
    from lmms_eval.api.instance import unwrap_generation_output

    docs = [{"image": image, "answer": colour} for image, colour in zip(squares, COLOURS)]
    model.task_dict = {"colours": {"test": docs}}
    greedy = model.pipeline.chat(QUESTION, images=[squares[0]], max_new_tokens=2).text
    visual = lambda doc: [doc["image"]]  # noqa: E731
    arguments = [
        (QUESTION, greedy, visual, 0, "colours", "test"),
        (QUESTION, "red cat", visual, 0, "colours", "test"),
        (
            QUESTION,
            lambda doc: doc["answer"],
            visual,
            1,
            "colours",
            "test",
        ),  # a loglikelihood task's doc_to_target
        ("", "blue"),  # the unconditional request of mutual-information metrics
    ]
    scores = [
        unwrap_generation_output(result)[0]
        for result in model.loglikelihood([instance("loglikelihood", args, 0) for args in arguments])
    ]
    assert scores[0][1] is True and scores[1][1] is False  # the greedy answer is what chat writes
    assert all(loss > 0 for loss, _ in scores)  # mean negative log-likelihood: lower is likelier
    one_at_a_time = [
        unwrap_generation_output(model.loglikelihood([instance("loglikelihood", args, 0)])[0])[0]
        for args in arguments
    ]
    for (loss, flag), (alone, alone_flag) in zip(scores, one_at_a_time):  # padding in a batch changes nothing
        assert loss == pytest.approx(alone, abs=1e-5) and flag == alone_flag


def test_bad_requests_and_arguments_say_what_is_wrong(adapter_module, model, checkpoint):
    with pytest.raises(ValueError, match=r"unknown model_args \['temprature'\]"):
        adapter_module.UniMMLmms(pretrained=str(checkpoint), temprature=0.5)
    with pytest.raises(ValueError, match="dtype must be one of"):
        adapter_module.UniMMLmms(pretrained=str(checkpoint), dtype="fp8")
    model.task_dict = {"speech": {"test": [{"audio": {"array": [0.0], "sampling_rate": 16000}}]}}
    audio = instance(
        "generate_until", ("transcribe", {}, lambda doc: [doc["audio"]], 0, "speech", "test"), 0, "speech"
    )
    with pytest.raises(ValueError, match="task 'speech', doc 0 gives a dict visual"):
        model.generate_until([audio])
    with pytest.raises(NotImplementedError, match="UniMMPipeline.chat"):
        model.generate_until_multi_round([audio])


@pytest.mark.integration
def test_local_yaml_tasks_run_end_to_end(adapter_module, checkpoint, squares, tmp_path, monkeypatch):
    import datasets
    from lmms_eval import evaluator
    from lmms_eval import models as lmms_models
    from lmms_eval.tasks import TaskManager

    # A local dataset and two tasks over it: free-text answers and a multiple choice (loglikelihood).
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    rows = {"image": squares, "question": [QUESTION] * len(squares), "answer": COLOURS}
    data = tmp_path / "colours"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(data)
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(
        "def doc_to_visual(doc):\n    return [doc['image'].convert('RGB')]\n\n\n"
        "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return doc['question']\n"
    )
    common = f"""
        dataset_path: {data}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
    """
    (tasks / "colours_qa.yaml").write_text(
        textwrap.dedent("""
        task: colours_qa
        output_type: generate_until
        generation_kwargs:
          max_new_tokens: 3
          until: ["."]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """)
        + textwrap.dedent(common)
    )
    (tasks / "colours_mc.yaml").write_text(
        textwrap.dedent("""
        task: colours_mc
        output_type: multiple_choice
        doc_to_choice: ["red", "blue", "green"]
        metric_list:
          - metric: acc
        """)
        + textwrap.dedent(common)
    )
    # "unimm" by name, as `lmms-eval --model unimm` finds it: through the entry point once unimm is installed
    # with it, else registered here from the same manifest.
    if "unimm" not in lmms_models.list_available_models():
        lmms_models.MODEL_REGISTRY_V2.register_manifest(adapter_module.model_manifest())
    try:  # lmms-eval 0.7.3 patches filelock._api, which filelock 4 no longer has; one process needs no patch
        import filelock._api  # noqa: F401
    except ImportError:
        monkeypatch.setattr(evaluator._enable_reentrant_filelocks, "_patched", True, raising=False)

    results = evaluator.simple_evaluate(
        model="unimm",
        model_args=f"pretrained={checkpoint}",
        tasks=["colours_qa", "colours_mc"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=2,
        log_samples=True,
        bootstrap_iters=0,
    )

    # Free-text answers: what chat answers for each document, cut at the task's "until".
    pipeline = build_random_pipeline("tiny")
    samples = sorted(results["samples"]["colours_qa"], key=lambda sample: sample["doc_id"])
    assert [sample["doc_id"] for sample in samples] == list(range(len(COLOURS)))
    for sample in samples:
        expected = pipeline.chat(QUESTION, images=[squares[sample["doc_id"]]], max_new_tokens=3).text.split(
            "."
        )[0]
        assert sample["resps"] == [[expected]]
    exact = sum(sample["resps"][0][0].strip() == COLOURS[sample["doc_id"]] for sample in samples) / len(
        samples
    )
    assert results["results"]["colours_qa"]["exact_match,none"] == pytest.approx(exact)
    # Multiple choice: one (loss, is_greedy) per choice; lmms-eval picks the lowest loss.
    choices = ["red", "blue", "green"]
    correct = 0
    for sample in results["samples"]["colours_mc"]:
        losses = [response[0][0] for response in sample["resps"]]
        assert len(losses) == len(choices) and all(loss > 0 for loss in losses)
        correct += choices[losses.index(min(losses))] == COLOURS[sample["doc_id"]]
    assert results["results"]["colours_mc"]["acc,none"] == pytest.approx(correct / len(COLOURS))
