import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import unimm  # noqa: F401  (registers the Auto classes)
from unimm.llm import UniMMConfig, UniMMForCausalLM

BACKBONES = [(kind, tied) for kind in ("llama", "qwen2", "gpt2") for tied in (False, True)]


def test_config_extends_text_vocabulary_and_round_trips(tiny, tmp_path):
    config = tiny.config()
    vocabulary = config.image_vocabulary
    assert config.text_vocab_size == tiny.text_vocab
    assert (
        config.text_config.vocab_size == vocabulary.vocab_size == tiny.text_vocab + 3 + 4 + 4 + tiny.codebook
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, UniMMConfig)
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()
    assert (
        loaded.text_config.vocab_size == vocabulary.vocab_size and loaded.text_vocab_size == tiny.text_vocab
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(codebook_size=0), "codebook_size"),
        (dict(default_grid_height=9), "default_grid"),
        (dict(image_loss_weight=-1.0), "image_loss_weight"),
        (dict(text_vocab_size=10), "text_config.vocab_size"),
    ],
)
def test_config_bad_values(tiny, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny.config(**overrides)


@pytest.mark.parametrize("kind, tied", BACKBONES)
def test_save_load_round_trip_with_auto_classes(tiny, tmp_path, kind, tied):
    model = tiny.model(kind, tied)
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, UniMMForCausalLM)
    assert (loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight) == tied
    input_ids = torch.tensor([[1, 5, 6, 70, 90]])
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loss_matches_plain_language_model(tiny, kind):
    model = tiny.model(kind)
    input_ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 10, 11, 12, 13, 14]])
    labels = input_ids.clone()
    labels[:, :2] = -100
    ours = model(input_ids, labels=labels)
    reference = model.language_model(input_ids, labels=labels)
    torch.testing.assert_close(ours.loss, reference.loss)
    torch.testing.assert_close(ours.text_loss, reference.loss)
    assert torch.isnan(ours.image_loss)


def test_loss_weights_image_tokens(tiny):
    model = tiny.model(image_loss_weight=2.0)
    vocabulary = model.vocabulary
    image = vocabulary.image_to_token_ids(torch.tensor([[0, 1], [2, 3]])).tolist()
    input_ids = torch.tensor([[1, 5, 6, *image, 7]])
    output = model(input_ids, labels=input_ids)
    targets = input_ids[0, 1:]
    token_loss = F.cross_entropy(output.logits[0, :-1], targets, reduction="none")
    is_image = targets >= tiny.text_vocab
    expected = (token_loss[~is_image].sum() + 2.0 * token_loss[is_image].sum()) / targets.numel()
    torch.testing.assert_close(output.loss, expected)
    torch.testing.assert_close(output.image_loss, token_loss[is_image].mean())
    # num_items_in_batch replaces the local count (gradient accumulation convention).
    scaled = model(input_ids, labels=input_ids, num_items_in_batch=2 * targets.numel())
    torch.testing.assert_close(scaled.loss, expected / 2)


@pytest.mark.parametrize(("kind", "tied"), [("llama", False), ("gpt2", True)])
def test_loss_without_logits_matches_the_full_head(tiny, kind, tied):
    """return_logits=False (training) runs the head only where there is a target: same loss and gradients."""
    model = tiny.model(kind, tied, image_loss_weight=0.5)  # eval mode: no dropout, gradients still flow
    image = model.vocabulary.image_to_token_ids(torch.tensor([[0, 1, 2], [3, 4, 5]])).tolist()
    input_ids = torch.tensor([[1, 5, 6, *image, 7], [1, 8, 9, 10, 11, 12, 13, 14, 15, 16, *image[:6]]])
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[1, -3:] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        output = model(input_ids, attention_mask=attention_mask, labels=labels, return_logits=return_logits)
        output.loss.backward()
        gradient = model.get_input_embeddings().weight.grad.clone()
        results.append((output, gradient))
    (full, full_gradient), (sparse, sparse_gradient) = results
    assert sparse.logits is None and full.logits is not None
    for name in ("loss", "text_loss", "image_loss"):
        torch.testing.assert_close(getattr(sparse, name), getattr(full, name))
    torch.testing.assert_close(sparse_gradient, full_gradient)


@pytest.mark.parametrize(("kind", "tied"), [("llama", False), ("qwen2", True), ("gpt2", True)])
def test_shared_prefix_gives_the_loss_and_gradients_of_the_full_batch(tiny, kind, tied):
    """shared_prefix_length: the rows' common start runs once and the rest attends to its keys and values as
    to a cache; loss, per-modality losses and every parameter's gradient are the full forward's."""
    model = tiny.model(kind, tied, image_loss_weight=0.5)
    image = model.vocabulary.image_to_token_ids(torch.tensor([[0, 1, 2], [3, 4, 5]])).tolist()
    prefix = [1, 5, 6, 7]
    rows = [[*prefix, 8, *image, 9], [*prefix, 10, 11, *image, 12, 13, 14], [*prefix, 15, 16, *image]]
    length = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])  # (3, T), right-padded
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    labels[:, : len(prefix) + 1] = -100  # no target in the prefix nor at the token after it
    results = []
    for shared in (0, len(prefix)):
        model.zero_grad()
        output = model(input_ids, attention_mask=attention_mask, labels=labels, return_logits=False,
                       shared_prefix_length=shared)  # fmt: skip
        output.loss.backward()
        gradients = {
            name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None
        }
        results.append((output, gradients))
    (full, full_gradients), (shared, shared_gradients) = results
    for name in ("loss", "text_loss", "image_loss"):
        torch.testing.assert_close(getattr(shared, name), getattr(full, name))
    assert shared_gradients.keys() == full_gradients.keys() and len(full_gradients) > 5
    for name, gradient in full_gradients.items():
        torch.testing.assert_close(shared_gradients[name], gradient, msg=name)


def test_shared_prefix_needs_the_kv_cache(tiny):
    """Under gradient checkpointing transformers turns the KV cache off: the shared prefix says so."""
    model = tiny.model("llama").train()
    model.gradient_checkpointing_enable()
    input_ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 5, 6, 7, 10, 11]])
    labels = input_ids.clone()
    labels[:, :5] = -100
    with pytest.raises(ValueError, match="needs the decoder's KV cache"):
        model(input_ids, labels=labels, return_logits=False, shared_prefix_length=4)


@pytest.mark.integration
def test_shared_prefix_compiled_by_layer_is_one_graph_for_every_layer(tiny):
    """Decoder layers compiled by region run the shared prefix's cache without a graph per layer: the graphs do
    not grow with the layer count (each layer its own graph would pass dynamo's recompile limit of 8 at 30
    layers, and the rest run eager), and the compiled loss is the eager one."""
    from accelerate.utils import compile_regions_deepspeed
    from torch._dynamo.utils import counters

    prefix = [1, 5, 6, 7, 8, 9]
    graphs = {}
    for num_layers in (2, 5):
        config = tiny.config("llama")
        config.text_config.num_hidden_layers = num_layers
        torch.manual_seed(0)
        eager = UniMMForCausalLM(config).train()
        compiled = UniMMForCausalLM(config).train()
        compiled.load_state_dict(eager.state_dict())
        compile_regions_deepspeed(compiled)
        torch._dynamo.reset()
        counters.clear()
        for length in (12, 14, 17):
            generator = torch.Generator().manual_seed(length)
            input_ids = torch.randint(3, tiny.text_vocab, (3, length), generator=generator)
            input_ids[:, : len(prefix)] = torch.tensor(prefix)
            labels = input_ids.clone()
            labels[:, : len(prefix) + 1] = -100
            inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                          return_logits=False, shared_prefix_length=len(prefix))  # fmt: skip
            torch.testing.assert_close(compiled(**inputs).loss, eager(**inputs).loss)
        graphs[num_layers] = counters["stats"]["unique_graphs"]
    assert graphs[2] > 0 and graphs[5] == graphs[2]


@pytest.mark.parametrize("tied", [False, True])
def test_from_text_model_keeps_text_logits(tiny, tied):
    torch.manual_seed(0)
    text_model = AutoModelForCausalLM.from_config(tiny.text_config("llama", tied)).eval()
    input_ids = torch.tensor([[1, 5, 6, 7, 8]])
    reference = text_model(input_ids).logits.clone()
    model = UniMMForCausalLM.from_text_model(text_model, codebook_size=tiny.codebook, max_grid_height=4, max_grid_width=4,
                                             default_grid_height=4, default_grid_width=4).eval()  # fmt: skip
    assert model.config.text_vocab_size == tiny.text_vocab
    assert model.get_input_embeddings().weight.shape[0] == model.vocabulary.vocab_size
    logits = model(input_ids).logits
    torch.testing.assert_close(logits[..., : tiny.text_vocab], reference, rtol=0, atol=1e-6)
    assert torch.isfinite(logits).all()


def test_codebook_init_keeps_geometry_and_text_rows(tiny):
    model = tiny.model()
    vocabulary = model.vocabulary
    text_rows = model.get_input_embeddings().weight[: tiny.text_vocab].clone()
    generator = torch.Generator().manual_seed(0)
    semantic = torch.randn(tiny.codebook, 8, generator=generator)
    pixel = torch.randn(tiny.codebook, 4, generator=generator)
    semantic[1], pixel[1] = semantic[0], pixel[0]  # two identical entries
    semantic[2], pixel[2] = semantic[0] + 0.01, pixel[0]  # a near twin
    model.init_code_embeddings((semantic, pixel))
    for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        rows = matrix[vocabulary.code_token_offset :]
        torch.testing.assert_close(rows[0], rows[1])
        near = F.cosine_similarity(rows[0] - rows.mean(0), rows[2] - rows.mean(0), dim=0)
        assert near > 0.99
    torch.testing.assert_close(model.get_input_embeddings().weight[: tiny.text_vocab], text_rows)
    with pytest.raises(ValueError, match="codebook_vectors"):
        model.init_code_embeddings(torch.zeros(tiny.codebook + 1, 4))


def test_from_text_model_rejects_loading_kwargs_with_instance(tiny):
    text_model = AutoModelForCausalLM.from_config(tiny.text_config("llama"))
    with pytest.raises(ValueError, match="only apply when `text_model` is a path"):
        UniMMForCausalLM.from_text_model(text_model, codebook_size=tiny.codebook, dtype=torch.float16)


def test_plain_generate_works_for_text(tiny):
    model = tiny.model()
    input_ids = torch.tensor([[1, 5, 6]])
    generated = model.generate(input_ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    reference = model.language_model.generate(input_ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert torch.equal(generated, reference)


def test_cache_argument_uses_the_backbones_name_and_old_name_warns(tiny):
    """The KV cache goes in as ``cache`` (transformers' current name); ``past_key_values`` still works with
    transformers' FutureWarning; the generation engine triggers no such warning."""
    model = tiny.model()
    ids = torch.tensor([[1, 5, 6, 7]])
    full = model(ids).logits[:, -1]
    prefix = model(ids[:, :3], use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        step = model(ids[:, 3:], cache=prefix.cache).logits[:, -1]
        model.generate_multimodal([[1, 5]], mode=["image"], image_grid=(2, 2))
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
    with pytest.warns(FutureWarning, match="past_key_values"):
        model(ids[:, :3], past_key_values=model(ids[:, :3], use_cache=True).cache)
