import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from unimm.llm import apply_lora, merge_lora


@pytest.mark.parametrize("kind, tied", [("llama", False), ("llama", True), ("gpt2", False)])
def test_lora_trains_adapters_and_new_rows_only_then_merges(tiny, tmp_path, kind, tied):
    model = tiny.model(kind, tied)
    vocabulary = model.vocabulary
    embedding_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable) and any(
        "trainable_tokens" in name for name in trainable
    )
    assert not any(name.endswith("embed_tokens.weight") or name.endswith("wte.weight") for name in trainable)

    image = vocabulary.image_to_token_ids(torch.tensor([[0, 1], [2, 3]])).tolist()
    input_ids = torch.tensor([[1, 5, 6, *image, 2]])
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    for _ in range(3):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=input_ids).logits

    merged = merge_lora(peft_model)
    assert not isinstance(merged, PeftModel)
    embedding = merged.get_input_embeddings().weight
    start = vocabulary.text_vocab_size
    torch.testing.assert_close(embedding[:start], embedding_before[:start])  # text rows frozen
    assert not torch.allclose(embedding[start:], embedding_before[start:])  # image rows trained
    if not tied:
        head = merged.get_output_embeddings().weight
        torch.testing.assert_close(head[:start], head_before[:start])
        assert not torch.allclose(head[start:], head_before[start:])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)


def test_lora_bad_input(tiny):
    with pytest.raises(ValueError, match="UniMMForCausalLM"):
        apply_lora(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="`r`"):
        apply_lora(tiny.model(), r=0)
