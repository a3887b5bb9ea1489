"""diffusers' offload and device-map API on ``UniMMPipeline``, run on the CPU (which stands in for the accelerator:
this tier has none): model CPU offload hooks every model, the nested detokenizer's too, in one chain; each
model is brought in by the calls that are not its ``forward``; the outputs are the resident pipeline's.
Sequential offload is refused with the alternative; ``device_map`` reaches the nested detokenizer. The CUDA
runs are in ``tests/gpu/test_devices.py``."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from diffusers.utils.torch_utils import get_device

from unimm.detokenizer import DetokenizerPipeline
from unimm.pipelines import UniMMPipeline
from unimm.pipelines.testing import build_random_pipeline


@pytest.fixture
def offloaded() -> UniMMPipeline:
    pipeline = build_random_pipeline("tiny", seed=0)  # the same weights as `tiny_pipeline`, hooked apart
    pipeline.set_progress_bar_config(disable=True)
    pipeline.enable_model_cpu_offload(device="cpu")
    return pipeline


@pytest.fixture
def image() -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (16, 16), "white")
    image.paste((200, 30, 30), (0, 0, 8, 16))
    return image


def models(pipeline: UniMMPipeline) -> dict[str, torch.nn.Module]:
    return {
        "visual_tokenizer": pipeline.visual_tokenizer,
        "llm": pipeline.llm,
        "decoder": pipeline.detokenizer.decoder,
    }


def record_onloads(pipeline: UniMMPipeline) -> list[tuple[str, str]]:
    """The models the offload hooks bring in, in order, each with what brought it: its ``forward`` (the hook
    gets the forward's arguments), or a ``"call"`` of another method. Until the hooks are re-armed (each
    pipeline call ends so)."""
    names = {id(module): name for name, module in models(pipeline).items()}
    onloads: list[tuple[str, str]] = []
    for user_hook in pipeline._all_hooks:
        pre_forward = user_hook.hook.pre_forward

        def recording(module, *args, pre_forward=pre_forward, **kwargs):
            onloads.append((names[id(module)], "forward" if args or kwargs else "call"))
            return pre_forward(module, *args, **kwargs)

        user_hook.hook.pre_forward = recording
    return onloads


def test_model_cpu_offload_seq_names_the_pipelines_models(tiny_pipeline):
    components = tiny_pipeline.components
    names = UniMMPipeline.model_cpu_offload_seq.split("->")
    assert sorted(names) == sorted(name for name, c in components.items() if isinstance(c, torch.nn.Module))
    nested = DetokenizerPipeline.model_cpu_offload_seq.split("->")
    assert set(nested) <= set(tiny_pipeline.detokenizer.components)


def test_model_cpu_offload_hooks_every_model_in_one_chain(offloaded):
    hooks = {name: module._hf_hook for name, module in models(offloaded).items()}
    assert hooks["visual_tokenizer"].prev_module_hook is None
    assert hooks["llm"].prev_module_hook.model is offloaded.visual_tokenizer
    # The nested pipeline's decoder follows the llm: the llm leaves the device when the decoder comes in.
    assert hooks["decoder"].prev_module_hook.model is offloaded.llm
    assert len(offloaded._all_hooks) == 3


def test_an_offloaded_pipeline_gives_the_resident_pipelines_outputs(offloaded, tiny_pipeline, image):
    onloads = record_onloads(offloaded)
    answer = offloaded.chat("what is this ?", images=[image], max_new_tokens=4)
    assert answer.texts == tiny_pipeline.chat("what is this ?", images=[image], max_new_tokens=4).texts
    # The tokenizer's `encode`, then the pipeline before the engine ran (the engine calls the language model
    # inside, never the llm's own hooked forward), brought their models in.
    assert onloads[:2] == [("visual_tokenizer", "call"), ("llm", "call")]

    options = dict(seed=[0, 1], decoder="diffusion", num_inference_steps=2)
    onloads = record_onloads(offloaded)
    ours = offloaded.generate_images(["a cat", "a dog"], **options)
    assert ("decoder", "call") in onloads  # the condition is computed outside the decoder's forward
    expected = tiny_pipeline.generate_images(["a cat", "a dog"], **options)
    assert torch.equal(ours.image_token_ids, expected.image_token_ids)
    assert [picture.tobytes() for picture in ours.images] == [
        picture.tobytes() for picture in expected.images
    ]

    onloads = record_onloads(offloaded)
    codes = offloaded.reconstruct([image], decoder="pixel").image_token_ids
    assert torch.equal(codes[0], tiny_pipeline.reconstruct([image], decoder="pixel").image_token_ids[0])
    assert set(onloads) == {("visual_tokenizer", "call")}  # `encode` and `decode`, not the forward


def test_without_an_accelerator_model_offload_asks_for_one():
    if get_device() != "cpu":
        pytest.skip(f"an accelerator is visible ({get_device()})")
    pipeline = build_random_pipeline("tiny", seed=0)
    with pytest.raises(RuntimeError, match="requires accelerator"):  # diffusers' own refusal
        pipeline.enable_model_cpu_offload()


def test_remove_all_hooks_removes_the_nested_detokenizers_too(offloaded):
    offloaded.remove_all_hooks()
    assert not any(hasattr(module, "_hf_hook") for module in models(offloaded).values())


def test_sequential_cpu_offload_is_refused_with_the_alternative():
    pipeline = build_random_pipeline("tiny", seed=0)
    with pytest.raises(NotImplementedError, match=r"use enable_model_cpu_offload\(\)"):
        pipeline.enable_sequential_cpu_offload(device="cpu")


def test_device_map_reaches_the_nested_detokenizer(tiny_checkpoint):
    pipeline = UniMMPipeline.from_pretrained(tiny_checkpoint, device_map="cpu")
    assert pipeline.hf_device_map == pipeline.detokenizer.hf_device_map == "cpu"
