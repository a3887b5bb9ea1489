"""The one training loop, shared by every stage, on the DeepSpeed engine.

    recipe -> stage.build_model / build_datasets / validate -> resume check -> deepspeed.initialize
           -> for each micro-batch: stage.compute_loss -> engine.backward -> engine.step
           -> every N steps: log, evaluate, write samples, checkpoint -> final checkpoint -> export

The same code runs as one plain process (it sets up a single-rank group itself) or under the
``deepspeed`` launcher / ``torchrun`` on any number of processes; DeepSpeed does the distribution.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import yaml
from accelerate.utils import compile_regions_deepspeed, set_seed
from deepspeed.accelerator import get_accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from unimm.training import distributed
from unimm.training.arguments import Recipe, TrainingArguments
from unimm.training.checkpoint import (
    CheckpointManager,
    RunFingerprint,
    TrainState,
    model_fingerprint,
    read_trainer_state,
)
from unimm.training.deepspeed_config import (
    fill_deepspeed_config,
    load_deepspeed_config,
    partitioned_model_init,
    zero_stage,
)
from unimm.training.export import EXPORT_DIR, export_checkpoint
from unimm.training.loader import build_loader, move_to_device, set_position
from unimm.training.tracking import MetricsLogger

logger = logging.getLogger(__name__)

FUSED_ADAMW_DEVICES = ("cpu", "cuda")

RECIPE_FILE = "recipe.yaml"
UNITS = "_units"  # throughput units of a logging window, summed over ranks with the metrics


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    last_loss: float | None
    checkpoint: Path
    export_dir: Path | None


def train(recipe: Recipe) -> TrainResult:
    """Train ``recipe``'s stage to the end (resuming if its output folder holds a checkpoint)."""
    return TrainingLoop(recipe).run()


class _Window:
    """Sums over the micro-batches since the last log line, and the training time they took (the clock
    is paused while the loop logs, evaluates, writes samples or checkpoints).

    Losses and metrics stay tensors on the device until the log line: reading a value every micro-step
    would make the host wait for the accelerator each time. A nan metric was not measured in its
    micro-batch and is averaged over the ones that measured it."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self.started = time.perf_counter()
        self.micro_batches = 0
        self.units = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, metrics: dict[str, Any], units: int) -> None:
        self.micro_batches += 1
        self.units += units
        for key, value in {"loss": loss, **metrics}.items():
            value = torch.as_tensor(value, device=loss.device).detach().float()
            finite = torch.isfinite(value)
            self.sums[key] = self.sums.get(key, 0.0) + torch.where(finite, value, 0.0)
            self.counts[key] = self.counts.get(key, 0.0) + finite.float()

    def pause(self) -> None:
        self.elapsed += time.perf_counter() - self.started

    def resume(self) -> None:
        self.started = time.perf_counter()

    def totals(self) -> dict[str, float]:
        """``sum/<key>`` and ``count/<key>`` of every metric, read from the device in one go."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        pairs = torch.stack([torch.stack([self.sums[key], self.counts[key]]) for key in keys]).tolist()
        return {
            f"{kind}/{key}": value
            for key, pair in zip(keys, pairs)
            for kind, value in zip(("sum", "count"), pair)
        }


def window_means(totals: dict[str, float]) -> dict[str, float]:
    """Per-metric means from (rank-averaged) ``sum/``/``count/`` totals: a ratio of means is the mean over
    every measurement of every rank."""
    keys = [key.removeprefix("sum/") for key in totals if key.startswith("sum/")]
    return {key: totals[f"sum/{key}"] / totals[f"count/{key}"] for key in keys if totals[f"count/{key}"] > 0}


class _DeviceLoader:
    """Iterates a loader with every batch moved to the engine's device (for stage.evaluate)."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device, dtype: torch.dtype | None):
        self.loader, self.device, self.dtype = loader, device, dtype

    def __iter__(self) -> Iterator[Any]:
        return (move_to_device(batch, self.device, self.dtype) for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


class TrainingLoop:
    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.args: TrainingArguments = recipe.training
        self.stage = recipe.build_stage()
        self.output_dir = Path(self.args.output_dir)
        self.float_dtype = torch.bfloat16 if self.args.bf16 else None

    # ----------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Build and check everything; every input error surfaces here, before the first step."""
        args = self.args
        distributed.init_distributed(args.ddp_timeout, args.main_process_timeout)
        distributed.check_shared_storage(self.output_dir)  # now, not when the first checkpoint is written
        self.watchdog = distributed.Watchdog(args.ddp_timeout)
        self.watchdog.start()
        set_seed(args.seed)
        world_size = distributed.world_size()
        self.deepspeed_config = fill_deepspeed_config(
            load_deepspeed_config(args.deepspeed_config), args, world_size
        )
        train_set, eval_set = self.stage.build_datasets()  # data errors first: they are cheap to find
        main = distributed.is_main_process()
        self.tracker = MetricsLogger(
            self.output_dir, args.report_to, enabled=main, config=self.recipe.to_dict()
        )
        if main:
            (self.output_dir / RECIPE_FILE).write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
        with partitioned_model_init(self.deepspeed_config):
            model = self.stage.build_model()
        self.stage.validate(model, train_set)
        self.fingerprint = RunFingerprint(
            stage=args.stage,
            model=model_fingerprint(model),
            world_size=world_size,
            global_batch_size=self.deepspeed_config["train_batch_size"],
        )
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", args.save_total_limit)
        resume = self.checkpoints.choose(args.resume_from_checkpoint)
        if resume is not None:
            self.checkpoints.check_compatible(resume, self.fingerprint)
        self.train_loader, self.eval_loader = self._build_loaders(train_set, eval_set)
        self.total_steps = self._total_steps()
        self.engine = self._build_engine(model)
        if self.eval_loader is not None:
            self.eval_loader = _DeviceLoader(self.eval_loader, self.engine.device, self.float_dtype)
        self.state, self.last_loss = TrainState(), None
        if resume is not None:
            self.state = self.checkpoints.load(self.engine, self.stage, resume)
            self.last_loss = read_trainer_state(resume).get("last_loss")
            self.tracker.truncate_after(self.state.global_step)

    def _build_loaders(self, train_set: Any, eval_set: Any) -> tuple[Any, Any]:
        args = self.args
        common = {"rank": distributed.rank(), "world_size": distributed.world_size(), "seed": args.seed}
        common["collate_fn"], common["num_workers"] = self.stage.collate, args.dataloader_num_workers
        common["device"] = get_accelerator().current_device_name()  # pinned host memory for an accelerator
        lengths = self.stage.sample_lengths(train_set) if args.group_by_length else None
        train_loader = build_loader(
            train_set,
            args.per_device_train_batch_size,
            shuffle=True,
            lengths=lengths,
            group_batches=args.length_group_batches,
            **common,
        )
        if eval_set is None:
            return train_loader, None
        return train_loader, build_loader(eval_set, args.per_device_eval_batch_size, shuffle=False, **common)

    def _total_steps(self) -> int:
        self.micro_batches_per_epoch = len(self.train_loader) // self.args.gradient_accumulation_steps
        self.micro_batches_per_epoch *= self.args.gradient_accumulation_steps
        if self.micro_batches_per_epoch == 0:
            raise ValueError(
                f"the training set gives {len(self.train_loader)} batch(es) per rank, fewer than one optimizer "
                f"step (gradient_accumulation_steps={self.args.gradient_accumulation_steps})"
            )
        steps_per_epoch = self.micro_batches_per_epoch // self.args.gradient_accumulation_steps
        return (
            self.args.max_steps if self.args.max_steps > 0 else steps_per_epoch * self.args.num_train_epochs
        )

    def _build_engine(self, model: nn.Module) -> Any:
        args = self.args
        groups = component_parameter_groups(
            model, self.stage.parameter_groups(model), args.component_learning_rates
        )
        optimizer, model_parameters = None, groups
        if "optimizer" not in self.deepspeed_config:
            betas = (args.adam_beta1, args.adam_beta2)
            optimizer = torch.optim.AdamW(
                groups,
                lr=args.learning_rate,
                betas=betas,
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
                # One kernel per step instead of one op per tensor group (transformers' default optimizer too);
                # torch has it on CPU and CUDA only.
                fused=True if get_accelerator().device_name() in FUSED_ADAMW_DEVICES else None,
            )
            model_parameters = None
        warmup_steps = args.warmup_steps or math.ceil(args.warmup_ratio * self.total_steps)

        def build_scheduler(optimizer: torch.optim.Optimizer) -> Any:
            return get_scheduler(
                args.lr_scheduler_type,
                optimizer,
                num_warmup_steps=warmup_steps,
                num_training_steps=self.total_steps,
            )

        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=model_parameters,
            lr_scheduler=build_scheduler,
            config=self.deepspeed_config,
        )
        if args.torch_compile and args.torch_compile_regions:
            # One graph per kind of block: the decoder layers share theirs (in-place `module.compile()`, which
            # keeps DeepSpeed's hooks on the modules).
            compile_regions_deepspeed(engine.module)
        elif args.torch_compile:
            engine.compile()
        return engine

    # -------------------------------------------------------------------------------------- training
    def run(self) -> TrainResult:
        with torch_functions_restored():
            return self._run()

    def _run(self) -> TrainResult:
        self.setup()
        self.progress = tqdm(
            total=self.total_steps,
            initial=self.state.global_step,
            desc=f"train {self.args.stage}",
            disable=not distributed.is_main_process(),
            dynamic_ncols=True,
        )
        self.window = _Window()
        try:
            while self.state.global_step < self.total_steps:
                self._train_epoch()
            return self._finish()
        finally:
            self.watchdog.stop(left=False)  # after an error the peers should notice this rank is gone
            self.progress.close()
            self.tracker.close()

    def _train_epoch(self) -> None:
        state, accumulation = self.state, self.args.gradient_accumulation_steps
        set_position(self.train_loader, state.epoch, state.batches_in_epoch)
        for batch in self.train_loader:
            self._micro_step(batch)
            state.batches_in_epoch += 1
            if state.batches_in_epoch % accumulation:
                continue
            state.global_step = self.engine.global_steps
            end_of_epoch = state.batches_in_epoch >= self.micro_batches_per_epoch
            if end_of_epoch:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            self._on_step_end()
            if end_of_epoch or state.global_step >= self.total_steps:
                return
        # Only reached if the loader ran out early: go on with the next epoch rather than loop forever.
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    def _micro_step(self, batch: Any) -> None:
        units = self.stage.count_units(batch)  # on the host batch: free, where the device one would sync
        batch = move_to_device(batch, self.engine.device, self.float_dtype)
        loss, metrics = self.stage.compute_loss(self.engine, batch, self.state.global_step)
        self.engine.backward(loss)
        self.engine.step()
        self.window.add(loss.detach(), metrics, units)

    def _on_step_end(self) -> None:
        step, args = self.state.global_step, self.args
        self.window.pause()
        self.progress.update(1)
        if step % args.logging_steps == 0 or step == self.total_steps:
            self._log_train()
        if args.eval_steps and step % args.eval_steps == 0:
            if self.eval_loader is not None:
                self._evaluate()
            self._run_eval_tasks()
        if args.sample_steps and step % args.sample_steps == 0:
            self._write_samples()
        if step % args.save_steps == 0 and step < self.total_steps:
            self._save()
        self.window.resume()

    def _log_train(self) -> None:
        window, self.window = self.window, _Window()
        totals = distributed.mean_over_ranks({**window.totals(), UNITS: window.units}, self.engine.device)
        world_units = totals.pop(UNITS) * distributed.world_size()
        means = window_means(totals)
        unit = self.stage.throughput_unit
        record = {"step": self.state.global_step, "epoch": self.state.epoch, "split": "train", **means}
        record.update(
            {"lr": self.engine.get_lr()[0], f"{unit}_per_second": world_units / max(window.elapsed, 1e-9)}
        )
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self.last_loss = means["loss"]
        self.tracker.log(record)
        self.progress.set_postfix(
            loss=f"{means['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            **{f"{unit}/s": f"{record[f'{unit}_per_second']:.0f}"},
        )

    def _evaluate(self) -> dict[str, float]:
        self.engine.eval()
        # Eager, like samples and eval tasks: a compiled model would compile again for evaluation's batches.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            metrics = self.stage.evaluate(self.engine, self.eval_loader)
        self.engine.train()
        metrics = distributed.mean_over_ranks(metrics, self.engine.device)
        self.tracker.log({"step": self.state.global_step, "split": "eval", **metrics})
        if distributed.is_main_process():
            logger.info("step %d eval: %s", self.state.global_step, metrics)
        return metrics

    @contextlib.contextmanager
    def _main_process_inference(self) -> Iterator[bool]:
        """Inference work that rank 0 does alone (samples, eval tasks): the full parameters, eval mode, eager
        (a compiled model would compile again for every shape the generation loop passes it); yields whether
        this rank is the one, and the others wait for it afterwards."""
        self.engine.eval()
        with torch.no_grad(), gathered_parameters(self.engine), torch.compiler.set_stance("force_eager"):
            yield distributed.is_main_process()
        self.engine.train()
        distributed.wait_for_main_process()

    def _run_eval_tasks(self) -> None:
        """The stage's evaluation tasks (learning curves of what the model can do), on rank 0, eager."""
        if not self.stage.has_eval_tasks:
            return
        step = self.state.global_step
        with self._main_process_inference() as main:
            if main:
                directory = self.output_dir / "eval_tasks" / f"step-{step:08d}"
                metrics = self.stage.run_eval_tasks(self.engine.module, step, directory)
                self.tracker.log({"step": step, "split": "tasks", **metrics})
                logger.info("step %d eval tasks: %s", step, metrics)

    def _write_samples(self) -> None:
        directory = self.output_dir / "samples" / f"step-{self.state.global_step:08d}"
        with self._main_process_inference() as main:
            if main:
                paths = self.stage.write_samples(self.engine.module, self.state.global_step, directory)
                logger.info(
                    "step %d: wrote %d sample file(s) to %s", self.state.global_step, len(paths), directory
                )

    def _save(self) -> Path:
        metadata = {
            "fingerprint": dataclasses.asdict(self.fingerprint),
            "recipe": self.recipe.to_dict(),
            "zero_stage": zero_stage(self.deepspeed_config),
            "last_loss": self.last_loss,
        }
        return self.checkpoints.save(self.engine, self.stage, self.state, metadata)

    def _finish(self) -> TrainResult:
        args = self.args
        evaluated_last_step = args.eval_steps and self.state.global_step % args.eval_steps == 0
        if not evaluated_last_step:
            if self.eval_loader is not None:
                self._evaluate()
            self._run_eval_tasks()
        checkpoint = self._save()
        self.watchdog.stop()
        distributed.barrier()  # every rank has told the others it leaves on purpose
        export_dir = None
        if args.export_at_end:
            export_dir = self.output_dir / EXPORT_DIR
            # Rank 0 alone, from the files on disk: the other ranks do not wait (an export can outlast any
            # collective timeout), and the launcher ends the job when rank 0 is done.
            if distributed.is_main_process():
                export_checkpoint(checkpoint, export_dir, recipe=self.recipe)
        return TrainResult(self.output_dir, self.state.global_step, self.last_loss, checkpoint, export_dir)


@contextlib.contextmanager
def torch_functions_restored() -> Iterator[None]:
    """ZeRO-3 replaces ``torch.nn.functional.linear`` with its memory-efficient version for good ("this will
    persist unless manually reset"): put torch's back when the run ends, so that whatever this process
    does next (generate, evaluate, train another stage) runs torch's own numerics."""
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def gathered_parameters(engine: Any) -> contextlib.AbstractContextManager:
    """Under ZeRO-3, the full parameters on every rank for the duration; otherwise a no-op."""
    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def component_parameter_groups(
    model: nn.Module, groups: list[dict[str, Any]], learning_rates: dict[str, float]
) -> list[dict[str, Any]]:
    """Split the stage's parameter groups so parameters under a name prefix get that prefix's lr."""
    names = {id(param): name for name, param in model.named_parameters()}
    used: set[str] = set()
    result = []
    for group in groups:
        by_prefix: dict[str | None, list[nn.Parameter]] = defaultdict(list)
        for param in group["params"]:
            prefix = next((prefix for prefix in learning_rates if names[id(param)].startswith(prefix)), None)
            by_prefix[prefix].append(param)
        for prefix, params in by_prefix.items():
            result.append({**group, "params": params, **({"lr": learning_rates[prefix]} if prefix else {})})
            used.add(prefix)
    unused = sorted(set(learning_rates) - used)
    if unused:
        raise ValueError(f"component_learning_rates: no trainable parameter name starts with {unused}")
    return [group for group in result if group["params"]]
