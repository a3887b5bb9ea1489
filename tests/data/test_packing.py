import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from unimm.data.bad_records import BadRecords
from unimm.data.packing import (
    FLASH_VARLEN_KEYS,
    IGNORE_INDEX,
    PACKED_COLUMNS,
    PackedCollator,
    flash_varlen_kwargs,
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


def test_collator_pads_and_builds_no_mask():
    rows = list(pack_examples(_examples([3, 2]), max_length=8))
    batch = PackedCollator(max_length=8, pad_token_id=PAD_TOKEN_ID)(rows)
    # No (B, 1, T, T) mask: the restarting positions are what keeps the samples apart.
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
    assert batch["use_cache"] is False
    assert all(batch[key].shape == (1, 8) and batch[key].dtype == torch.long for key in PACKED_COLUMNS)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"][0, 5:].tolist() == [IGNORE_INDEX] * 3
    assert batch["input_ids"][0, 5:].tolist() == [PAD_TOKEN_ID] * 3
    assert sequence_ids(batch["position_ids"]).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    # The samples are those transformers finds in the position ids (when the model runs without a cache).
    torch.testing.assert_close(
        find_packed_sequence_indices(batch["position_ids"]), sequence_ids(batch["position_ids"])
    )


def test_collator_refuses_rows_longer_than_max_length():
    with pytest.raises(ValueError, match="exceeds max_length=4"):
        PackedCollator(max_length=4, pad_token_id=PAD_TOKEN_ID)(
            [{"input_ids": [1] * 5, "labels": [1] * 5, "position_ids": list(range(5))}]
        )


def _packed_and_alone_logits(model, rows, examples, sample_index, logits):
    """Per packed example: its logits inside the pack (t, V), its logits run alone (t, V), its labels (1, t)."""
    for (row_index, sample), example in _locate(rows, examples):
        input_ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor([example["labels"]])
        with torch.no_grad():
            alone = model(input_ids=input_ids).logits  # (1, t, V)
        in_pack = sample_index[row_index] == sample  # (T,)
        yield logits[row_index][in_pack], alone[0], labels


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_batch_gives_the_same_logits_and_per_sample_loss_as_unpacked(attn_implementation):
    model = _tiny_llama(attn_implementation)
    examples = _examples([5, 9, 4, 11, 2, 6, 7])
    rows = list(pack_examples(examples, max_length=MAX_LENGTH))
    batch = PackedCollator(MAX_LENGTH, PAD_TOKEN_ID)(rows)
    assert batch["input_ids"].shape[0] < len(examples)  # really packed

    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
        packed_output = model(**batch)
    sample_index = sequence_ids(batch["position_ids"])  # (B, T)
    total_loss, total_tokens = 0.0, 0
    for in_pack, alone, labels in _packed_and_alone_logits(
        model, rows, examples, sample_index, packed_logits
    ):
        torch.testing.assert_close(in_pack, alone, atol=1e-5, rtol=1e-5)
        alone_losses = _token_losses(alone[None], labels)[0]  # (t,)
        torch.testing.assert_close(
            _token_losses(in_pack[None], labels)[0], alone_losses, atol=1e-5, rtol=1e-5
        )
        total_loss += alone_losses.sum().item()
        total_tokens += int((labels[0, 1:] != IGNORE_INDEX).sum())
    # The model's own loss over the packed batch is the token-weighted mean of the unpacked losses.
    assert packed_output.loss.item() == pytest.approx(total_loss / total_tokens, rel=1e-5)


def test_position_ids_alone_leak_across_samples_when_the_model_keeps_a_cache():
    """Why every packed batch says ``use_cache=False``: if transformers starts isolating packed samples with
    a cache too, this test fails and that key can go."""
    model = _tiny_llama("sdpa")
    rows = list(pack_examples(_examples([5, 4]), max_length=9))
    batch = PackedCollator(9, PAD_TOKEN_ID)(rows)
    second_sample = sequence_ids(batch["position_ids"])[0] == 1
    with torch.no_grad():
        with_cache = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        without_cache = model(**{k: batch[k] for k in ("input_ids", "position_ids", "use_cache")}).logits
        alone = model(input_ids=batch["input_ids"][:, second_sample]).logits
    torch.testing.assert_close(without_cache[:, second_sample], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_cache[:, second_sample], alone, atol=1e-3)


def test_flash_varlen_kwargs_match_transformers_over_the_flattened_batch():
    rows = list(pack_examples(_examples([5, 9, 4, 11, 2, 6, 7]), max_length=MAX_LENGTH))
    batch = PackedCollator(MAX_LENGTH, PAD_TOKEN_ID, flash_attention=True)(rows)
    assert len(rows) > 1
    # transformers reads them from position ids only for a batch of one row: flatten the rows into one.
    (cu_seq_lens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(
        batch["position_ids"].reshape(1, -1)
    )
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == cu_seq_lens.tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == int(max_length)
    assert isinstance(batch["max_length_q"], int)  # flash attention takes a Python int


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``flash_attn_varlen_func``'s semantics on the CPU (a stand-in for flash attention): the batch flattened
    to one sequence, causal attention within each ``cu_seq_lens_q`` segment, nothing across."""
    assert attention_mask is None
    batch_size, heads, length, head_dim = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)  # (B, H, T, D): grouped-query heads expanded
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    flat = [x.transpose(0, 1).reshape(heads, batch_size * length, head_dim) for x in (query, key, value)]
    output = torch.empty_like(flat[0])  # (H, B·T, D)
    bounds = kwargs["cu_seq_lens_q"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[:, start:end] for x in flat)
        output[:, start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    return output.reshape(heads, batch_size, length, head_dim).permute(1, 2, 0, 3), None  # (B, T, H, D)


def test_flash_varlen_kwargs_reach_the_attention_and_keep_the_samples_apart(monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "varlen_reference", _varlen_attention)
    model = _tiny_llama("varlen_reference")
    examples = _examples([5, 9, 4, 11, 2, 6, 7])
    rows = list(pack_examples(examples, max_length=MAX_LENGTH))
    batch = PackedCollator(MAX_LENGTH, PAD_TOKEN_ID, flash_attention=True)(rows)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
    reference = _tiny_llama("sdpa")  # the same weights (same seed)
    sample_index = sequence_ids(batch["position_ids"])
    for in_pack, alone, _ in _packed_and_alone_logits(reference, rows, examples, sample_index, packed_logits):
        torch.testing.assert_close(in_pack, alone, atol=1e-5, rtol=1e-5)


def test_flash_varlen_kwargs_start_a_sample_at_every_row():
    position_ids = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])  # one full-length sample, then two
    kwargs = flash_varlen_kwargs(position_ids)
    assert set(kwargs) == set(FLASH_VARLEN_KEYS)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 4, 6, 8]
    assert kwargs["max_length_q"] == 4


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
