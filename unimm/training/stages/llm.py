"""Training stages ``llm_pretrain`` and ``llm_sft``: next-token prediction for a causal LM, full or LoRA.

The model is any ``AutoModelForCausalLM``: a saved ``UniMMForCausalLM`` (text + image vocabulary;
``import unimm.llm`` registers it), a plain text LM, or a config built from the recipe. The data are
token sequences (pre-tokenized: image ids already in the LLM's vocabulary) in a ``datasets`` folder,
JSONL or parquet with an ``input_ids`` column; ``llm_sft`` also needs ``labels`` with ``-100`` where no
loss is taken (prompts), ``llm_pretrain`` learns every token.

``text_kl_weight`` anchors a LoRA-tuned model to its own frozen base on text: on the targets of every row
that holds no image token (text replay, plain chats), it adds ``KL(base || tuned)`` over the text vocabulary,
with the base's distribution computed by the same model with its adapters switched off (no second copy in
memory). Self-distillation on the full distribution, not only on the base's greedy tokens, is what keeps a
pretrained chat LM's text skills while LoRA and the new rows learn images (learning without forgetting).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import datasets
import pyarrow.compute
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from unimm.data.collators import PaddingCollator, shared_prefix_length
from unimm.data.packing import (
    FLASH_VARLEN_KEYS,
    IGNORE_INDEX,
    PACKED_COLUMNS,
    PackedCollator,
    flash_varlen_kwargs,
    pack_dataset,
)
from unimm.llm import UniMMForCausalLM, UniMMProcessor  # importing unimm.llm registers the Auto classes
from unimm.llm.lora import apply_lora
from unimm.training.stages.base import TrainingStage

logger = logging.getLogger(__name__)

TOKENS_COLUMN = "input_ids"
LABELS_COLUMN = "labels"
# A batch's shared prefix (LlmArguments.shared_prefix) runs apart only from this many tokens on: the second decoder
# call costs more than a shorter prefix saves.
MIN_SHARED_PREFIX = 8
SHARED_PREFIX_KEY = "shared_prefix_length"
# Per-modality losses a UniMMForCausalLM output carries, logged next to the loss.
MODALITY_LOSSES = ("text_loss", "image_loss")
TABLE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PROCESSOR_CONFIG = "processor_config.json"  # a UniMMProcessor saved next to the initial model


@dataclass
class LlmArguments:
    """Recipe fields of the ``llm_pretrain`` and ``llm_sft`` stages."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a saved model folder (UniMMForCausalLM or any causal LM)"}
    )
    model_config: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "build a fresh model from this config instead ({model_type: llama, ...})"},
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_name_or_path"})
    attn_implementation: str | None = None
    train_dataset: str | None = field(default=None, metadata={"help": "datasets folder, .jsonl or .parquet"})
    eval_dataset: str | None = None
    random_tokens: int = field(
        default=0,
        metadata={"help": "train on N random sequences instead of a dataset (smoke runs, benchmarks)"},
    )
    data_seed: int = 0
    max_length: int = 512
    packing: bool = field(
        default=False, metadata={"help": "pack samples into max_length rows (no attention across samples)"}
    )
    gradient_checkpointing: bool = False
    shared_prefix: bool = field(
        default=False,
        metadata={
            "help": "a unified model's loss: the tokens that all rows of a batch start with and that hold no "
            "target (a chat template's system prompt) run once per batch, their keys and values shared by every "
            "row; the same loss and gradients for less work (padded rows; no gradient checkpointing)"
        },
    )
    lora_rank: int = field(default=0, metadata={"help": "> 0: train LoRA adapters of this rank instead"})
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "'all-linear' or 'q_proj,v_proj'"}
    )
    lora_modules_to_save: list[str] = field(
        default_factory=list,
        metadata={
            "help": "modules trained in full next to LoRA for a plain LM (embed_tokens, lm_head); a "
            "UniMMForCausalLM trains its image-token rows instead (unimm.llm.lora.apply_lora)"
        },
    )
    text_kl_weight: float = field(
        default=0.0,
        metadata={
            "help": "with LoRA: weight of KL(base || tuned) over the text vocabulary on the targets of rows "
            "with no image token, the base being the model with its adapters off (keeps text skills)"
        },
    )

    sample_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "text-to-image prompts drawn into a PNG grid every sample_steps (a UniMM model)"},
    )
    sample_tokenizer_path: str | None = field(
        default=None,
        metadata={
            "help": "the visual tokenizer of the sample grids and the eval tasks (its pixel decoder draws)"
        },
    )
    sample_images_per_prompt: int = 4
    sample_guidance_scale: float = 3.0
    eval_tasks: str | None = field(
        default=None,
        metadata={
            "help": "a task file (as `unimm eval --tasks-file`) run on the model every eval_steps and at the end "
            "(a UniMM model; needs sample_tokenizer_path): its figures go to metrics.jsonl (split `tasks`), its "
            "reports to output_dir/eval_tasks/step-NNNNNNNN (eight digits)"
        },
    )

    def __post_init__(self) -> None:
        if self.sample_prompts and self.sample_tokenizer_path is None:
            raise ValueError(
                "sample_prompts need sample_tokenizer_path (the visual tokenizer that decodes them)"
            )
        if self.eval_tasks is not None:
            if self.sample_tokenizer_path is None:
                raise ValueError(
                    "eval_tasks need sample_tokenizer_path (the visual tokenizer of the pipeline)"
                )
            if not Path(self.eval_tasks).is_file():
                raise FileNotFoundError(f"eval_tasks {self.eval_tasks!r} does not exist")
            from unimm.evaluation.task_runner import load_task_file

            load_task_file(self.eval_tasks)  # an unknown task or option fails now, not hours into the run
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise ValueError("set exactly one of model_name_or_path and model_config")
        if (self.train_dataset is None) == (self.random_tokens == 0):
            raise ValueError("set exactly one of train_dataset and random_tokens")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.text_kl_weight < 0:
            raise ValueError(f"text_kl_weight must be >= 0, got {self.text_kl_weight}")
        if self.shared_prefix and (self.packing or self.gradient_checkpointing):
            raise ValueError(
                "shared_prefix runs the rows' common start once and lets every row attend to its KV cache: it "
                "needs padded rows (packing: false) and the cache (gradient_checkpointing: false)"
            )
        if self.text_kl_weight and self.lora_rank == 0:
            raise ValueError(
                "text_kl_weight needs lora_rank > 0: the frozen base it anchors to is the model with its "
                "LoRA adapters switched off"
            )


class TokenDataset(torch.utils.data.Dataset):
    """Rows of a token table as dicts of int lists (the given columns, truncated to ``max_length``)."""

    def __init__(self, table: datasets.Dataset, max_length: int, columns: Sequence[str]) -> None:
        self.table, self.max_length = table, max_length
        self.columns = [column for column in columns if column in table.column_names]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        row = self.table[index]
        return {key: list(row[key])[: self.max_length] for key in self.columns}

    def lengths(self) -> list[int]:
        """Every row's length as it is served (at most ``max_length``), from the column's offsets (in the
        table's row order: a ``select``ed table keeps its indices)."""
        column = self.table.with_format("arrow")[TOKENS_COLUMN]
        lengths = pyarrow.compute.list_value_length(column)
        return [min(length, self.max_length) for length in lengths.to_pylist()]

    def max_token_id(self) -> int:
        tokens = pyarrow.compute.list_flatten(self.table.data.column(TOKENS_COLUMN))
        return int(pyarrow.compute.max(tokens).as_py())


def load_token_table(path: str, name: str) -> datasets.Dataset:
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder or a JSONL/parquet file."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"{name} {path!r} does not exist")
    if source.is_dir():
        table = datasets.load_from_disk(str(source))
        if isinstance(table, datasets.DatasetDict):
            raise ValueError(f"{name} {path!r} holds splits {list(table)}; point it at one split's folder")
        return table
    if source.suffix not in TABLE_LOADERS:
        raise ValueError(f"{name} {path!r}: expected a datasets folder or one of {sorted(TABLE_LOADERS)}")
    return datasets.load_dataset(TABLE_LOADERS[source.suffix], data_files=str(source), split="train")


def random_token_table(num_rows: int, length: int, vocab_size: int, seed: int) -> datasets.Dataset:
    """Random sequences; their ``labels`` mask the first half, as if it were a prompt."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (num_rows, length), generator=generator)
    labels = tokens.clone()
    labels[:, : length // 2] = IGNORE_INDEX
    return datasets.Dataset.from_dict({TOKENS_COLUMN: tokens.tolist(), LABELS_COLUMN: labels.tolist()})


def _modality_metrics(outputs: Any) -> dict[str, torch.Tensor]:
    """The per-modality losses an output carries, as detached tensors (nan: no such targets in the batch).

    Tensors, not floats: they are read at logging time, so a step never waits for the device."""
    losses = {name: getattr(outputs, name, None) for name in MODALITY_LOSSES}
    return {name: value.detach() for name, value in losses.items() if value is not None}


def _combined_modality_metrics(
    parts: Sequence[tuple[Any, torch.Tensor]], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Per-modality mean losses over several forwards of one batch, weighted by each one's target counts
    (tensors; nan where the batch has no such target)."""
    if not isinstance(model, UniMMForCausalLM):
        return _modality_metrics(parts[0][0]) if len(parts) == 1 else {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for outputs, labels in parts:
        targets = labels[:, 1:]
        valid = targets != IGNORE_INDEX
        is_image = model.vocabulary.is_image_token(targets) & valid
        for name, mask in (("text_loss", valid & ~is_image), ("image_loss", is_image)):
            count = mask.sum()
            value = torch.nan_to_num(getattr(outputs, name).detach())  # nan only where count is 0
            sums[name] = sums.get(name, 0) + value * count
            counts[name] = counts.get(name, 0) + count
    return {name: sums[name] / counts[name] for name in sums}  # 0 / 0 = nan: no such targets


def _select_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The rows ``rows`` (a (B,) bool mask) of a batch; flash attention's varlen arguments, which describe
    the whole flattened batch, are recomputed for them."""
    selected = {
        key: value[rows] if torch.is_tensor(value) else value
        for key, value in batch.items()
        if key not in FLASH_VARLEN_KEYS
    }
    if FLASH_VARLEN_KEYS[0] in batch:
        selected.update(flash_varlen_kwargs(selected["position_ids"]))
    return selected


def _flat_numbers(values: Any, prefix: str) -> dict[str, float]:
    """The numbers of a nested metrics mapping, keyed by their path (``understanding/accuracy``)."""
    if isinstance(values, dict):
        flat: dict[str, float] = {}
        for key, value in values.items():
            flat.update(_flat_numbers(value, f"{prefix}/{key}"))
        return flat
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return {prefix: float(values)}
    return {}


def uses_flash_attention(config: Any) -> bool:
    """Whether a model config asks for a flash-attention kernel (``flash_attention_2``/``_3``, hub kernels)."""
    return "flash" in str(getattr(config, "_attn_implementation", None) or "")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine and a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if isinstance(model, PeftModel) else model


class LlmStage(TrainingStage):
    """Shared by both LLM stages; they differ only in where the labels come from."""

    arguments_class = LlmArguments
    throughput_unit = "tokens"
    requires_labels: ClassVar[bool]

    def __init__(self, stage_args: LlmArguments) -> None:
        super().__init__(stage_args)
        self.set_pad_token_id(0)
        self._sample_pipeline = None  # built on the first sample step, around the model being trained

    def set_pad_token_id(self, pad_token_id: int, flash_attention: bool = False) -> None:
        """Build the collator; packed rows for a flash-attention model also carry its varlen arguments."""
        if self.args.packing:
            self.collator = PackedCollator(self.args.max_length, pad_token_id, flash_attention)
        else:
            self.collator = PaddingCollator(pad_token_id)

    # ----------------------------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        args = self.args
        extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
        if args.model_config is not None:
            config_values = dict(args.model_config)
            config = AutoConfig.for_model(config_values.pop("model_type"), **config_values)
            model = AutoModelForCausalLM.from_config(config, **extra)
        else:
            if not Path(args.model_name_or_path).exists():
                raise FileNotFoundError(f"model_name_or_path {args.model_name_or_path!r} does not exist")
            gguf = {"gguf_file": args.gguf_file} if args.gguf_file else {}
            model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **gguf, **extra)
        text_config = model.config.get_text_config()
        pad_token_id = text_config.pad_token_id
        self.set_pad_token_id(
            pad_token_id if pad_token_id is not None else 0, uses_flash_attention(text_config)
        )
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        return self._with_lora(model) if args.lora_rank > 0 else model

    def _with_lora(self, model: nn.Module) -> nn.Module:
        args = self.args
        targets = args.lora_target_modules
        targets = targets if targets == "all-linear" else [name.strip() for name in targets.split(",")]
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        if isinstance(model, UniMMForCausalLM):
            return apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, targets)
        config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets,
            modules_to_save=list(args.lora_modules_to_save) or None,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    # ------------------------------------------------------------------------------------ data
    def build_datasets(self) -> tuple[TokenDataset, TokenDataset | None]:
        args = self.args
        if args.random_tokens:
            vocab_size = self._vocab_size_hint()
            train = random_token_table(args.random_tokens, args.max_length, vocab_size, args.data_seed)
            return self._token_dataset(train), None
        train = self._token_dataset(self._checked_table(args.train_dataset, "train_dataset"))
        if args.eval_dataset is None:
            return train, None
        return train, self._token_dataset(self._checked_table(args.eval_dataset, "eval_dataset"))

    def _token_dataset(self, table: datasets.Dataset) -> TokenDataset:
        """Keep the columns this stage learns from (pretraining ignores labels), packed if asked."""
        keep = [TOKENS_COLUMN, LABELS_COLUMN] if self.requires_labels else [TOKENS_COLUMN]
        table = table.select_columns([column for column in keep if column in table.column_names])
        if self.args.packing:
            return TokenDataset(
                pack_dataset(table, self.args.max_length), self.args.max_length, PACKED_COLUMNS
            )
        return TokenDataset(table, self.args.max_length, keep)

    def _vocab_size_hint(self) -> int:
        if self.args.model_config is not None:
            return int(self.args.model_config["vocab_size"])
        return int(AutoConfig.from_pretrained(self.args.model_name_or_path).get_text_config().vocab_size)

    def _checked_table(self, path: str, name: str) -> datasets.Dataset:
        table = load_token_table(path, name)
        required = [TOKENS_COLUMN] + ([LABELS_COLUMN] if self.requires_labels else [])
        missing = [column for column in required if column not in table.column_names]
        if missing:
            raise ValueError(
                f"{name} {path!r}: stage {self.name!r} needs column(s) {missing}; it has {table.column_names}"
            )
        if len(table) == 0:
            raise ValueError(f"{name} {path!r} is empty")
        return table

    def validate(self, model: nn.Module, train_dataset: torch.utils.data.Dataset) -> None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None or not hasattr(model, "generate"):
            raise TypeError(f"stage {self.name!r} trains causal LMs; got {type(model).__name__}")
        # A peft wrapper (trainable token rows) has no num_embeddings; its weight still has one row per token,
        # whose full shape ZeRO-3 keeps in ds_shape once it partitions the weight.
        weight = embeddings.weight
        vocab_size = (
            getattr(embeddings, "num_embeddings", None) or getattr(weight, "ds_shape", weight.shape)[0]
        )
        largest = train_dataset.max_token_id()
        if largest >= vocab_size:
            raise ValueError(
                f"train data holds token id {largest} but the model's vocabulary has {vocab_size} rows: "
                "was the data tokenized for another model (or another image vocabulary)?"
            )

    def sample_lengths(self, dataset: TokenDataset) -> list[int]:
        if self.args.packing:
            raise ValueError(
                "group_by_length: packed rows are all max_length long; use packing or group_by_length, not both"
            )
        return dataset.lengths()

    def collate(self, samples: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        """Padded batches (``unimm.data.collators``), or packed rows (``unimm.data.packing``: no mask, the
        samples kept apart by their restarting ``position_ids``). With ``shared_prefix``, the batch also says
        how many leading tokens its rows share (0: too few to run apart), counted here on the host."""
        batch = self.collator(samples)
        if self.args.shared_prefix:
            length = shared_prefix_length(batch)
            batch[SHARED_PREFIX_KEY] = length if length >= MIN_SHARED_PREFIX else 0
        return batch

    # ------------------------------------------------------------------------------------ loss
    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and detached metric tensors (nan: not measured in this batch), read at logging time."""
        # Training reads no KV cache, and packed rows are kept apart only without one.
        batch = {**batch, "use_cache": False}
        shared_prefix = batch.pop(SHARED_PREFIX_KEY, 0)
        if self.args.text_kl_weight:
            return self._text_anchored_loss(model, batch, shared_prefix)
        # A unified model computes its head only where there is a target (most positions have none).
        extra = {}
        if isinstance(_unwrap(model), UniMMForCausalLM):
            extra = {"return_logits": False, SHARED_PREFIX_KEY: shared_prefix}
        outputs = model(**batch, **extra)
        return outputs.loss, _modality_metrics(outputs)

    def _text_anchored_loss(
        self, model: nn.Module, batch: dict[str, Any], shared_prefix: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The next-token loss of the batch, plus ``text_kl_weight`` times the mean KL(base || tuned) per
        target token of its text-only rows. Rows with image tokens take the loss-only forward; text rows
        a forward with logits. Both share the batch's target count as the denominator, so the sum is the
        loss of one forward over the whole batch. The loss-only forward runs ``shared_prefix`` leading tokens
        once (a subset of the rows shares what all of them do)."""
        base_model = _unwrap(model)
        labels = batch["labels"]
        num_items = (labels[:, 1:] != IGNORE_INDEX).sum().clamp_min(1)
        if isinstance(base_model, UniMMForCausalLM):
            text_rows = ~base_model.vocabulary.is_image_token(batch["input_ids"]).any(dim=1)  # (B,)
            text_vocab_size = base_model.vocabulary.text_vocab_size
        else:
            text_rows = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
            text_vocab_size = None
        loss = torch.zeros((), device=labels.device)
        parts = []
        if not text_rows.all():
            image_part = _select_rows(batch, ~text_rows)
            outputs = model(
                **image_part,
                return_logits=False,
                num_items_in_batch=num_items,
                **({SHARED_PREFIX_KEY: shared_prefix} if isinstance(base_model, UniMMForCausalLM) else {}),
            )
            loss = loss + outputs.loss
            parts.append((outputs, image_part["labels"]))
        if not text_rows.any():  # every batch names the same metrics (the ranks reduce them together)
            no_text_kl = torch.full((), math.nan, device=labels.device)
            return loss, {**_combined_modality_metrics(parts, base_model), "text_kl": no_text_kl}
        text_part = _select_rows(batch, text_rows)
        outputs = model(**text_part, num_items_in_batch=num_items)
        parts.append((outputs, text_part["labels"]))
        targets = text_part["labels"][:, 1:] != IGNORE_INDEX  # (b, T - 1)
        tuned = outputs.logits[:, :-1][targets][:, :text_vocab_size].float()  # (N, V_text)
        peft_model = getattr(model, "module", model)
        with torch.no_grad(), peft_model.disable_adapter():
            inputs = {key: value for key, value in text_part.items() if key != "labels"}
            reference = peft_model(**inputs).logits[:, :-1][targets][:, :text_vocab_size].float()
        text_kl = F.kl_div(
            F.log_softmax(tuned, dim=-1),
            F.log_softmax(reference, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        loss = loss + outputs.loss + self.args.text_kl_weight * text_kl
        return loss, {**_combined_modality_metrics(parts, base_model), "text_kl": text_kl.detach()}

    def count_units(self, batch: dict[str, Any]) -> int:
        """Tokens processed: real tokens of padded rows; all positions of packed rows. Free on the host
        batch; on a device batch, padded rows cost a sync (count before moving the batch)."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()

    # --------------------------------------------------------------------------------- samples
    def _pipeline(self, model: UniMMForCausalLM) -> Any:
        """The pipeline around the model being trained (built once), for sample grids and eval tasks."""
        if self._sample_pipeline is None:
            from unimm.llm import UniMMProcessor
            from unimm.pipelines import UniMMPipeline
            from unimm.tokenizer import DualCodebookTokenizer

            visual_tokenizer = DualCodebookTokenizer.from_pretrained(self.args.sample_tokenizer_path).eval()
            processor = UniMMProcessor.from_pretrained(self.args.model_name_or_path)
            self._sample_pipeline = UniMMPipeline(model, processor, visual_tokenizer)
            self._sample_pipeline.set_progress_bar_config(disable=True)
        return self._sample_pipeline

    @torch.no_grad()
    def write_samples(self, model: nn.Module, step: int, output_dir: Path) -> list[Path]:
        """A PNG grid per sample step: one row per prompt, drawn by the model as the pipeline would
        (guided, constrained to the default grid) and decoded by the tokenizer's pixel decoder."""
        args = self.args
        model = _unwrap(model)  # peft injects its adapters in place: the base model draws with them
        if not args.sample_prompts or not isinstance(model, UniMMForCausalLM):
            return []
        from diffusers.utils import make_image_grid

        was_training = model.training
        model.eval()
        try:
            images = (
                self._pipeline(model)
                .generate_images(
                    args.sample_prompts,
                    num_images_per_prompt=args.sample_images_per_prompt,
                    guidance_scale=args.sample_guidance_scale,
                    seed=0,
                    decoder="pixel",
                )
                .images
            )
        finally:
            model.train(was_training)
        path = Path(output_dir) / f"generations-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = make_image_grid(images, rows=len(args.sample_prompts), cols=args.sample_images_per_prompt)
        grid.save(path)
        path.with_suffix(".txt").write_text("\n".join(args.sample_prompts) + "\n")  # the rows' prompts
        return [path]

    @property
    def has_eval_tasks(self) -> bool:
        return self.args.eval_tasks is not None

    @torch.no_grad()
    def run_eval_tasks(self, model: nn.Module, step: int, output_dir: Path) -> dict[str, float]:
        """The recipe's ``eval_tasks`` on the model being trained, as ``unimm eval`` runs them on a checkpoint:
        the report under ``output_dir``, every number of it as ``task/metric`` (nested names joined by ``/``)."""
        from unimm.evaluation.task_base import TaskContext
        from unimm.evaluation.task_runner import load_task_file, run_tasks

        model = _unwrap(model)
        if not self.has_eval_tasks or not isinstance(model, UniMMForCausalLM):
            return {}
        was_training = model.training
        model.eval()
        try:
            context = TaskContext(output_dir=Path(output_dir), checkpoint=self.args.model_name_or_path)
            run = run_tasks(self._pipeline(model), load_task_file(self.args.eval_tasks), context)
        finally:
            model.train(was_training)
        metrics: dict[str, float] = {}
        for result in run.results:
            metrics.update(_flat_numbers(result.metrics, result.label))
        return metrics

    # ---------------------------------------------------------------------------------- export
    def export(self, model: nn.Module, output_dir: Path) -> None:
        """A plain model folder (LoRA merged into the weights), with the processor it was prepared with
        (``unimm assemble`` takes it from there), else the text tokenizer when there is one."""
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        model.save_pretrained(output_dir)
        source = self.args.model_name_or_path
        if source is not None and (Path(source) / PROCESSOR_CONFIG).is_file():
            UniMMProcessor.from_pretrained(source).save_pretrained(output_dir)
        elif source is not None and (
            self.args.gguf_file or (Path(source) / "tokenizer_config.json").is_file()
        ):
            gguf = {"gguf_file": self.args.gguf_file} if self.args.gguf_file else {}
            AutoTokenizer.from_pretrained(source, **gguf).save_pretrained(output_dir)


class LlmPretrainStage(LlmStage):
    """Every token is a target (captions and images in either order, interleaved documents)."""

    name = "llm_pretrain"
    requires_labels = False


class LlmSftStage(LlmStage):
    """Targets come from the data's ``labels`` (the assistant's answers; ``-100`` on prompts)."""

    name = "llm_sft"
    requires_labels = True
