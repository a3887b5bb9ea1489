"""The word-level text tokenizer of from-scratch models (the demo model's)."""

from __future__ import annotations

from unimm.llm.text_tokenizer import SPECIAL_TOKENS, build_word_level_tokenizer

CORPUS = ["What is this?", "a t-shirt.", "an emoji of 1st place medal", "a sneaker."]


def test_vocabulary_and_round_trip() -> None:
    tokenizer = build_word_level_tokenizer(CORPUS)
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # Each word with and without its leading space, punctuation on its own: 8 specials + 28 entries.
    assert len(tokenizer) == 36
    for text in ["What is this?", "a sneaker.", "an emoji of 1st place medal", "is this a t-shirt?"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text.lower()
    assert tokenizer.convert_ids_to_tokens(
        tokenizer("a sneaker.", add_special_tokens=False)["input_ids"]
    ) == [
        "a",
        " sneaker",
        ".",
    ]
    assert tokenizer("a giraffe", add_special_tokens=False)["input_ids"][-1] == tokenizer.unk_token_id


def test_chat_template_is_prefix_stable_and_tokenizes_per_turn() -> None:
    tokenizer = build_word_level_tokenizer(CORPUS)
    turns = [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "a sneaker."}]
    first = tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
    both = tokenizer.apply_chat_template(turns, tokenize=False)
    assert first == "<|user|>What is this?<|end|><|assistant|>" and both.startswith(first)
    whole = tokenizer(both, add_special_tokens=False)["input_ids"]
    pieces = [
        tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in (first, both[len(first) :])
    ]
    assert whole == pieces[0] + pieces[1]  # the processor tokenizes turn by turn: the same ids
    assert tokenizer.unk_token_id not in whole
