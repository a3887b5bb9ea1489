"""Tiny end-to-end run: processor -> training steps -> constrained generation -> visual-tokenizer decode."""

import pytest
import torch
from PIL import Image

from unimm.data.schema import image_segment, text_segment
from unimm.llm import ModalitySampling, UniMMProcessor
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer


@pytest.mark.integration
def test_overfit_one_caption_then_generate_its_image(tiny, text_tokenizer):
    torch.manual_seed(0)
    vq_model = DualCodebookTokenizer(DualCodebookConfig.tiny()).eval()
    image_processor = DualCodebookImageProcessor.from_tokenizer_config(vq_model.config)
    model = tiny.model()
    processor = UniMMProcessor.from_config(model.config, text_tokenizer, image_processor, vq_model=vq_model)
    model.init_code_embeddings(vq_model.get_codebook_vectors())

    image = Image.new("RGB", (16, 16), "white")
    image.paste((200, 30, 30), (0, 0, 8, 16))
    sample = {"segments": [text_segment("draw a red bag", "user"), image_segment(image, "assistant")]}
    batch = processor(sample)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert loss.item() < 0.05

    prompt = processor(messages=[{"role": "user", "content": "draw a red bag"}], add_generation_prompt=True)
    grid = processor.encode_images([image])[0]
    output = model.generate_multimodal(
        prompt["input_ids"], mode="image", image_grid=tuple(grid.shape), image_sampling=ModalitySampling()
    )
    generated = output.image_token_ids[0][0]
    assert torch.equal(generated, grid)
    pixels = vq_model.decode(generated[None])
    assert pixels.shape == (1, 3, 16, 16)
