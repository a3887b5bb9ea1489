import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

from unimm.data.bad_records import BadRecords
from unimm.data.packing import (
    IGNORE_INDEX,
    PackedCollator,
    block_causal_mask,
    pack_dataset,
    pack_examples,
    plan_packs,
    sequence_ids,
)

VOCAB_SIZE = 64
PAD_TOKEN_ID = 0
MAX_LENGTH = 16


def _examples(lengths, seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        input_ids = torch.randint(1, VOCAB_SIZE, (length,), generator=generator).tolist()
        labels = list(input_ids)
        labels[: length // 3] = [IGNORE_INDEX] * (
            length // 3
        )  # a prompt without loss, as a processor masks it
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def _tiny_llama(attn_implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD_TOKEN_ID,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (B, T): token t's label is predicted from position t - 1, as the model's loss does."""
    shifted_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    losses = F.cross_entropy(
        logits.transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses  # (B, T)


def test_plan_packs_fills_rows_without_overflow():
    lengths = [9, 7, 5, 5, 3, 16, 17, 1, 0]
    packs = plan_packs(lengths, MAX_LENGTH)
    placed = sorted(index for pack in packs for index in pack)
    assert placed == [0, 1, 2, 3, 4, 5, 7]  # 17 tokens does not fit; an empty example is nothing to train on
    assert all(sum(lengths[i] for i in pack) <= MAX_LENGTH for pack in packs)
    assert len(packs) == 3  # 46 tokens in 3 rows of 16: best-fit decreasing is optimal here


def test_packed_row_matches_transformers_flattening_layout():
    examples = _examples([5, 7, 3])
    (row,) = pack_examples(examples, max_length=MAX_LENGTH)
    packed_order = sorted(examples, key=lambda example: -len(example["input_ids"]))  # best-fit decreasing
    flattened = DataCollatorWithFlattening()(packed_order, return_tensors="pt")
    assert row["input_ids"] == flattened["input_ids"][0].tolist()
    assert row["labels"] == flattened["labels"][0].tolist()
    assert row["position_ids"] == flattened["position_ids"][0].tolist()


def test_too_long_examples_are_counted_not_cut():
    bad_records = BadRecords()
    rows = list(pack_examples(_examples([4, 20, 6, 0]), max_length=MAX_LENGTH, bad_records=bad_records))
    assert [len(row["input_ids"]) for row in rows] == [10]
    assert dict(bad_records.counts) == {"too_long": 1, "missing_field": 1}
    assert "20 tokens, more than max_length=16" in bad_records.report()


def test_pack_dataset_map_style_and_streaming():
    examples = _examples([5, 9, 4, 11, 2, 6])
    dataset = datasets.Dataset.from_list([{**example, "source": "x"} for example in examples])
    packed = pack_dataset(dataset, max_length=MAX_LENGTH, window_size=3)
    assert packed.column_names == ["input_ids", "labels", "position_ids"]
    streamed = list(pack_dataset(dataset.to_iterable_dataset(), max_length=MAX_LENGTH, window_size=3))
    assert [row["input_ids"] for row in streamed] == packed["input_ids"]
    # Every token of every example is in exactly one row.
    assert sorted(token for row in packed["input_ids"] for token in row) == sorted(
        token for example in examples for token in example["input_ids"]
    )
    assert all(len(row) <= MAX_LENGTH for row in packed["input_ids"])


def test_collator_pads_and_builds_the_block_mask():
    rows = list(pack_examples(_examples([3, 2]), max_length=8))
    batch = PackedCollator(max_length=8, pad_token_id=PAD_TOKEN_ID, attention="4d")(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"][0, 5:].tolist() == [IGNORE_INDEX] * 3
    assert batch["input_ids"][0, 5:].tolist() == [PAD_TOKEN_ID] * 3
    assert sequence_ids(batch["position_ids"]).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    allowed = (batch["attention_mask"][0, 0] == 0).int()
    expected = torch.zeros(8, 8, dtype=torch.int)
    for start, end in [(0, 3), (3, 5), (5, 8)]:
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.int).tril()
    assert torch.equal(allowed, expected)


def test_collator_refuses_rows_longer_than_max_length():
    with pytest.raises(ValueError, match="exceeds max_length=4"):
        PackedCollator(max_length=4, pad_token_id=PAD_TOKEN_ID)(
            [{"input_ids": [1] * 5, "labels": [1] * 5, "position_ids": list(range(5))}]
        )


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("attention", ["position_ids", "4d"])
def test_packed_batch_gives_the_same_per_sample_loss_as_unpacked(attn_implementation, attention):
    model = _tiny_llama(attn_implementation)
    examples = _examples([5, 9, 4, 11, 2, 6, 7])
    rows = list(pack_examples(examples, max_length=MAX_LENGTH))
    batch = PackedCollator(MAX_LENGTH, PAD_TOKEN_ID, attention=attention)(rows)
    assert batch["input_ids"].shape[0] < len(examples)  # really packed

    # Packed position_ids alone isolate the samples only without a KV cache (see unimm.data.packing).
    call_options = {"use_cache": False} if attention == "position_ids" else {}
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}, **call_options).logits
        packed_losses = _token_losses(packed_logits, batch["labels"])  # (B, T)
        packed_output = model(**batch, **call_options)
    sample_index = sequence_ids(batch["position_ids"])  # (B, T)

    total_loss, total_tokens = 0.0, 0
    for row, example in _locate(rows, examples):
        input_ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor([example["labels"]])
        with torch.no_grad():
            alone = _token_losses(model(input_ids=input_ids).logits, labels)[0]  # (T,)
        row_index, sample = row
        in_pack = packed_losses[row_index][sample_index[row_index] == sample]
        torch.testing.assert_close(in_pack, alone, atol=1e-5, rtol=1e-5)
        total_loss += alone.sum().item()
        total_tokens += int((labels[0, 1:] != IGNORE_INDEX).sum())
    # The model's own loss over the packed batch is the token-weighted mean of the unpacked losses.
    assert packed_output.loss.item() == pytest.approx(total_loss / total_tokens, rel=1e-5)


def test_position_ids_alone_leak_across_samples_when_the_model_keeps_a_cache():
    """Guards the documented caveat: if transformers starts isolating packed samples with a cache too,
    this test fails and the caveat (and ``use_cache=False``) can go."""
    model = _tiny_llama("sdpa")
    rows = list(pack_examples(_examples([5, 4]), max_length=9))
    batch = PackedCollator(9, PAD_TOKEN_ID, attention="position_ids")(rows)
    second_sample = sequence_ids(batch["position_ids"])[0] == 1
    with torch.no_grad():
        with_cache = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        without_cache = model(**{k: batch[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits
        alone = model(input_ids=batch["input_ids"][:, second_sample]).logits
    torch.testing.assert_close(without_cache[:, second_sample], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_cache[:, second_sample], alone, atol=1e-3)


def _locate(rows, examples):
    """((row index, sample index within the row), example) for every packed example."""
    found = []
    for example in examples:
        for row_index, row in enumerate(rows):
            starts = [i for i, position in enumerate(row["position_ids"]) if position == 0]
            for sample, start in enumerate(starts):
                if row["input_ids"][start : start + len(example["input_ids"])] == example["input_ids"]:
                    found.append(((row_index, sample), example))
    assert len(found) == len(examples)
    return found


def test_block_causal_mask_of_a_single_sample_is_causal():
    mask = block_causal_mask(torch.arange(4)[None], dtype=torch.bfloat16)
    assert mask.dtype == torch.bfloat16
    assert torch.equal(mask[0, 0] == 0, torch.ones(4, 4, dtype=torch.bool).tril())
