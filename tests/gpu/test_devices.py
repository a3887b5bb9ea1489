"""Big-model placement on CUDA: the LLM split between the GPU and the CPU by a device map (the generation loop
then meets logits on another device than its own tensors), ``device_map="auto"``, a pipeline placed by
diffusers' ``device_map``, and ``enable_model_cpu_offload``: the same outputs as the model on one device."""

from __future__ import annotations

import pytest
import torch

from unimm.llm import ModalitySampling, UniMMForCausalLM
from unimm.pipelines import UniMMPipeline

pytestmark = pytest.mark.gpu

GREEDY = ModalitySampling(do_sample=False)
SCALE = 3.0
QUESTION = "What is this?"


def split_device_map(model: UniMMForCausalLM, first: int | str, second: int | str) -> dict[str, int | str]:
    """The embedding and the first half of the decoder layers on ``first``; the other layers, the final norm
    and the head on ``second`` (another GPU, or ``"cpu"``: offloaded, its weights brought to the GPU per call)."""
    decoder = "language_model.model"
    layers = model.config.text_config.num_hidden_layers
    device_map: dict[str, int | str] = {f"{decoder}.embed_tokens": first, f"{decoder}.rotary_emb": first}
    device_map.update(
        {f"{decoder}.layers.{index}": first if index < layers // 2 else second for index in range(layers)}
    )
    device_map.update({f"{decoder}.norm": second, "language_model.lm_head": second})
    return device_map


def devices(module: torch.nn.Module) -> set[str]:
    return {parameter.device.type for parameter in module.parameters()}


@pytest.fixture(scope="module")
def requests(demo_cpu, image_prompts, class_prompts, text_prompts) -> dict:
    conditional, unconditional = image_prompts(demo_cpu, class_prompts[:3])
    return {"images": (conditional, unconditional), "texts": text_prompts}


def generate(model: UniMMForCausalLM, requests: dict) -> tuple:
    conditional, unconditional = requests["images"]
    images = model.generate_multimodal(
        conditional,
        mode="image",
        guidance_scale=SCALE,
        unconditional_input_ids=unconditional,
        image_sampling=GREEDY,
    )
    texts = model.generate_multimodal(requests["texts"], mode="text", max_new_tokens=16)
    return images, texts


@pytest.mark.parametrize("second", ["cpu", 1], ids=["gpu-and-cpu-offload", "two-gpus"])
def test_an_llm_split_by_a_device_map_writes_the_references_greedy_tokens(
    demo_checkpoint, demo_cpu, requests, greedy_check, second
):
    """On two GPUs the loop's tensors live with the embedding and the logits come from the other device; with
    the second half offloaded to the CPU, its weights are meta tensors outside each module's call."""
    if second == 1 and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    device_map = split_device_map(demo_cpu.llm, 0, second)
    model = UniMMForCausalLM.from_pretrained(
        f"{demo_checkpoint}/llm", dtype=torch.float32, device_map=device_map
    )
    assert set(model.hf_device_map.values()) == {0, second}
    images, texts = generate(model.eval(), requests)
    conditional, unconditional = requests["images"]
    grids = [row_images[0] for row_images in images.image_token_ids]
    gap = greedy_check.image(demo_cpu.llm, conditional, unconditional, grids, SCALE)
    assert gap <= greedy_check.tolerance(torch.float32, SCALE)
    gap = greedy_check.text(demo_cpu.llm, requests["texts"], greedy_check.generated(texts))
    assert gap <= greedy_check.tolerance(torch.float32)


def test_device_map_auto_on_one_gpu_equals_the_model_moved_there(demo_checkpoint, cuda, requests):
    path = f"{demo_checkpoint}/llm"
    mapped = UniMMForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto").eval()
    moved = UniMMForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(cuda).eval()
    assert devices(mapped) == {"cuda"}
    for ours, expected in zip(generate(mapped, requests), generate(moved, requests)):
        assert torch.equal(ours.sequences, expected.sequences)


@pytest.mark.parametrize("device_map", ["cuda", "balanced"])
def test_a_pipeline_placed_by_device_map_puts_every_component_on_cuda(
    demo_checkpoint, demo_cuda, class_prompts, device_map
):
    pipeline = UniMMPipeline.from_pretrained(demo_checkpoint, dtype=torch.bfloat16, device_map=device_map)
    pipeline.set_progress_bar_config(disable=True)
    for name in ("llm", "visual_tokenizer"):
        assert devices(getattr(pipeline, name)) == {"cuda"}, name
    assert devices(pipeline.detokenizer.decoder) == {"cuda"}, "the nested detokenizer pipeline"
    options = dict(num_images_per_prompt=2, seed=0, decoder="diffusion", num_inference_steps=4)
    ours = pipeline.generate_images(class_prompts[:2], **options).images
    expected = demo_cuda.generate_images(class_prompts[:2], **options).images
    assert [image.tobytes() for image in ours] == [image.tobytes() for image in expected]


def test_model_cpu_offload_gives_the_resident_pipelines_outputs(
    demo_checkpoint, demo_cuda, demo_images, class_prompts, cuda
):
    """Offloaded, each model computes on CUDA when called and rests on the CPU in between: the same kernels
    as the pipeline kept on CUDA, so the same answers, codes and images."""
    pipeline = UniMMPipeline.from_pretrained(demo_checkpoint, dtype=torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.enable_model_cpu_offload(device=cuda)
    assert all(devices(getattr(pipeline, name)) == {"cpu"} for name in ("llm", "visual_tokenizer"))
    images, _ = demo_images
    answers = pipeline.chat([QUESTION] * 4, images=images[:4]).texts
    assert answers == demo_cuda.chat([QUESTION] * 4, images=images[:4]).texts
    codes = pipeline.reconstruct(images[:4], decoder="pixel").image_token_ids
    expected_codes = demo_cuda.reconstruct(images[:4], decoder="pixel").image_token_ids
    assert all(torch.equal(ours, expected) for ours, expected in zip(codes, expected_codes))
    options = dict(num_images_per_prompt=2, seed=0, decoder="diffusion", num_inference_steps=4)
    ours = pipeline.generate_images(class_prompts[:2], **options).images
    expected = demo_cuda.generate_images(class_prompts[:2], **options).images
    assert [image.tobytes() for image in ours] == [image.tobytes() for image in expected]
