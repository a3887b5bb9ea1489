import pytest
import torch

from unimm.llm import ImageVocabulary


@pytest.fixture
def vocabulary() -> ImageVocabulary:
    return ImageVocabulary(text_vocab_size=100, codebook_size=16, max_grid_height=4, max_grid_width=3)


def test_layout_golden_ids(vocabulary):
    assert (vocabulary.boi_token_id, vocabulary.eoi_token_id, vocabulary.eol_token_id) == (100, 101, 102)
    assert vocabulary.height_token_id(1) == 103 and vocabulary.height_token_id(4) == 106
    assert vocabulary.width_token_id(1) == 107 and vocabulary.width_token_id(3) == 109
    assert vocabulary.code_token_offset == 110
    assert vocabulary.vocab_size == 126 and vocabulary.num_new_tokens == 26
    assert len(vocabulary.token_strings) == 26 and vocabulary.token_strings[-1] == "<|img15|>"


def test_codes_round_trip_both_ways(vocabulary):
    codes = torch.arange(16).view(4, 4)
    token_ids = vocabulary.codes_to_token_ids(codes)
    assert token_ids.shape == codes.shape and int(token_ids[0, 0]) == 110 and int(token_ids[-1, -1]) == 125
    assert torch.equal(vocabulary.token_ids_to_codes(token_ids), codes)
    assert vocabulary.is_code_token(token_ids).all()
    assert not vocabulary.is_code_token(torch.tensor([99, 100, 109])).any()
    assert vocabulary.is_image_token(torch.tensor([99, 100, 125, 126])).tolist() == [False, True, True, False]


def test_image_sequence_round_trip(vocabulary):
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ids = vocabulary.image_to_token_ids(codes)
    assert ids.tolist() == [100, 104, 109, 111, 112, 113, 102, 114, 115, 116, 102, 101]
    assert len(ids) == vocabulary.image_sequence_length(2, 3)
    assert torch.equal(vocabulary.token_ids_to_image(ids), codes)


def test_split_images_separates_text_and_drops_unfinished(vocabulary):
    image = vocabulary.image_to_token_ids(torch.tensor([[0, 1]])).tolist()
    texts, images = vocabulary.split_images([5, 6, *image, 7, 100, 104])
    assert texts == [[5, 6], [7]]
    assert len(images) == 1 and images[0].tolist() == [[0, 1]]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda v: v.codes_to_token_ids(torch.tensor([16])), "codes"),
        (lambda v: v.token_ids_to_codes(torch.tensor([5])), "token_ids"),
        (lambda v: v.image_to_token_ids(torch.zeros(5, 1, dtype=torch.long)), "off the grid"),
        (lambda v: v.token_ids_to_image([100, 103, 107, 110, 101]), "needs 2"),
        (lambda v: v.height_token_id(0), "height"),
    ],
)
def test_bad_input_raises(vocabulary, call, match):
    with pytest.raises(ValueError, match=match):
        call(vocabulary)


def test_constructor_validates():
    with pytest.raises(ValueError, match="codebook_size"):
        ImageVocabulary(10, 0, 4, 4)
