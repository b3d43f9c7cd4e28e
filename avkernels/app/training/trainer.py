"""The training loop of one run (:mod:`avkernels.app.training`): steps, epoch ends,
evaluation, probes, checkpoints and resume, stops on request or Ctrl-C, several processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from avkernels import mask_patches
from avkernels.app.progress import progress_enabled
from avkernels.app.training import run_files
from avkernels.app.training.config import (
    AUTOCAST_DTYPES,
    MODALITIES,
    TrainConfig,
    patch_size,
)
from avkernels.app.training.dead_counters import (
    counter_state,
    epoch_dead_fractions,
    load_counter_state,
    reset_counters,
)
from avkernels.app.training.epoch_line import epoch_line, print_epoch_line
from avkernels.app.training.evaluation import accuracy_key, evaluate, linear_probe
from avkernels.app.training.model_setup import (
    StageNet,
    build_mask_ratios,
    build_model,
    build_optimizer,
    build_scheduler,
)
from avkernels.app.training.processes import training_device
from avkernels.app.training.rng import rng_state, seed_everything, set_rng_state
from avkernels.app.training.sampling import (
    EpochSampler,
    RankBatchSampler,
    batches_per_epoch,
    epoch_seed,
    rank_seed,
)
from avkernels.app.training.stopping import TrainingInterrupted, stop_on_sigint
from avkernels.distributed import Ranks, wrap_ddp
from avkernels.fust import ConfidenceTracker, MaskRatios


class Trainer:
    """Train one run of ``config`` on ``train_data`` into ``run_dir``.

    Args:
        train_data / eval_data: datasets of dict samples (:mod:`avkernels.app.training`,
            "Batches"); ``eval_data`` (optional) is evaluated after every epoch.
        resume: continue the run saved in ``run_dir`` (its config must equal ``config``);
            without it ``run_dir`` must not hold a run yet.
        device: where to train (default: cuda if available, see :func:`training_device`);
            not part of the config, so a run can be resumed elsewhere.
        num_workers: DataLoader workers (:mod:`avkernels.app.training`, "Reproducibility").
        progress: tqdm bars (rank 0 only); default: only when stderr is a terminal.
        on_step: called as ``on_step(trainer, global_step)`` after every optimizer step.
        on_epoch: called as ``on_epoch(trainer, rows)`` on every rank at each epoch end, with
            the epoch's new metrics rows (train, and eval when evaluated).

    :meth:`fit` runs (or finishes) the training and returns the metrics history. Built while a
    ``torch.distributed`` process group is initialised, every rank builds a Trainer with the
    same arguments and calls :meth:`fit` (:mod:`avkernels.app.training`, "Several processes").
    """

    def __init__(
        self,
        config: TrainConfig,
        train_data: Dataset,
        run_dir,
        *,
        eval_data: Dataset | None = None,
        resume: bool = False,
        device=None,
        num_workers: int = 0,
        progress: bool | None = None,
        on_step: Callable[[Trainer, int], None] | None = None,
        on_epoch: Callable[[Trainer, list[dict]], None] | None = None,
    ) -> None:
        config.validate()
        self.config, self.train_data, self.eval_data = config, train_data, eval_data
        self.run_dir = Path(run_dir)
        self.ranks = Ranks.current()
        self.device = training_device(device)
        self.num_workers, self.progress, self.on_step = num_workers, progress, on_step
        self.on_epoch = on_epoch
        self._stop = threading.Event()
        if len(train_data) == 0:
            raise ValueError("Trainer: the training set is empty")
        if config.batch_size < self.ranks.world_size:
            raise ValueError(
                f"Trainer: batch_size={config.batch_size} is the global batch, "
                f"split over the {self.ranks.world_size} processes: make it at "
                "least the number of processes"
            )
        checkpoint_path = self.run_dir / run_files.CHECKPOINT
        if resume and not checkpoint_path.is_file():
            raise FileNotFoundError(
                f"Trainer: nothing to resume: no {run_files.CHECKPOINT} in {self.run_dir}"
            )
        if not resume and checkpoint_path.exists():
            raise FileExistsError(
                f"Trainer: {self.run_dir} already holds a run; resume it "
                "(resume=True / --resume) or choose another directory"
            )
        if self.device.type == "cuda" and self.ranks.world_size > 1:
            torch.cuda.set_device(self.device)  # the device of the collectives
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(
                "Trainer: precision='fp16' needs a CUDA device (float16 autocast "
                "with a gradient scaler); on the CPU use precision='bf16'"
            )
        seed_everything(config.seed)
        self.model = build_model(config).to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        # Every rank builds the same initial model; then each draws from its own stream.
        self._own_seed = rank_seed(config.seed, self.ranks.rank)
        if self.ranks.rank:
            seed_everything(self._own_seed)
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler = build_scheduler(config, self.optimizer)
        self.trackers: dict[str, ConfidenceTracker] = {}
        if config.stage == "stage1":
            self.trackers = {m: ConfidenceTracker(len(train_data)) for m in config.modalities}
        self.ratios: MaskRatios | None = None
        if config.stage == "stage2":
            self.ratios = build_mask_ratios(config)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.finished = False
        self.history: list[dict] = []
        self._totals = self._zero_totals()
        if resume:
            self._load_checkpoint(checkpoint_path)
        self._net = StageNet(self.model, config.stage, self.modalities)
        if self.ranks.world_size > 1:
            self._net = wrap_ddp(
                self._net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    # -- state ------------------------------------------------------------------------------

    def _zero_totals(self) -> dict:
        return {
            "loss": 0.0,
            "samples": 0,
            "seconds": 0.0,
            **{f"correct_{m}": 0 for m in ("joint",) + MODALITIES},
        }

    def state_dict(self) -> dict:
        return {
            "format": run_files.CHECKPOINT_FORMAT,
            "version": run_files.CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "rng_other_ranks": [],
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "finished": self.finished,
            "trackers": {m: t.state_dict() for m, t in self.trackers.items()},
            "totals": dict(self._totals),
            "history": list(self.history),
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` atomically (and the metrics files from the history).

        With several processes every rank calls it: rank 0 writes, with every rank's RNG
        state, and all return once the files are in place."""
        rng_states, dead_counters = zip(
            *self.ranks.gather((rng_state(), counter_state(self.model)))
        )
        if self.ranks.is_main:
            state = self.state_dict()
            state["rng_other_ranks"] = list(rng_states[1:])
            state["dead_counters"] = list(dead_counters)
            run_files.write_checkpoint(self.run_dir, self.config.to_dict(), state, self.history)
        self.ranks.barrier()
        return self.run_dir / run_files.CHECKPOINT

    def _load_checkpoint(self, path: Path) -> None:
        state = run_files.read_checkpoint(path)
        saved = TrainConfig.from_dict(state["config"])
        differences = saved.differences(self.config)
        if differences:
            raise ValueError(
                "Trainer: the config differs from the run being resumed ("
                + "; ".join(differences)
                + "); resume with the saved config "
                f"({self.run_dir / run_files.CONFIG})"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # absent in checkpoints written before precision existed
            self.scaler.load_state_dict(state["scaler"])
        if state["global_step"]:
            # The optimizer stepped before the interruption: tell the scheduler, which would
            # otherwise warn of a wrong call order when the resumed run closes an epoch at once.
            self.optimizer._opt_called = True
        self.trackers = {}
        for modality, tracker_state in state["trackers"].items():
            self.trackers[modality] = ConfidenceTracker(tracker_state["num_samples"])
            self.trackers[modality].load_state_dict(tracker_state)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.finished = state["global_step"], state["finished"]
        # Totals saved before the epoch's wall time was recorded lack "seconds".
        self._totals = {**self._zero_totals(), **state["totals"]}
        self.history = list(state["history"])
        # Each rank continues its own stream; ranks the saved run did not have (it ran on fewer
        # processes) keep the fresh stream of rank_seed.
        rng_states = [state["rng"], *state.get("rng_other_ranks", [])]
        if self.ranks.rank < len(rng_states):
            set_rng_state(rng_states[self.ranks.rank])
        # The counters of the epoch so far (absent in checkpoints written before they were
        # saved); a rank the saved run did not have starts its count at the resume point.
        dead_counters = state.get("dead_counters", [])
        if self.ranks.rank < len(dead_counters):
            load_counter_state(self.model, dead_counters[self.ranks.rank])

    # -- the loop ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current step, checkpoint, and raise :class:`TrainingInterrupted`."""
        self._stop.set()

    def fit(self) -> list[dict]:
        """Train the remaining epochs (then the probes); returns the metrics history."""
        config = self.config
        if self.finished:
            return self.history
        sampler = EpochSampler(len(self.train_data), config.batch_size, config.seed)
        batches = RankBatchSampler(sampler, self.ranks)
        with stop_on_sigint(self):
            while self.epoch < config.epochs:
                sampler.set_epoch(self.epoch, self.step_in_epoch)
                if hasattr(self.train_data, "set_epoch"):  # augmentation of (seed, epoch, sample)
                    self.train_data.set_epoch(config.seed, self.epoch)
                loader = DataLoader(
                    self.train_data,
                    batch_sampler=batches,
                    num_workers=self.num_workers,
                    generator=torch.Generator().manual_seed(epoch_seed(self._own_seed, self.epoch)),
                )
                self._train_epoch(loader)
                self._end_epoch()
        if config.probe_epochs:
            self._probe_encoders()
        self.finished = True
        if self.ranks.is_main:
            run_files.write_model(self.run_dir, self.model.state_dict())
        self.save_checkpoint()
        return self.history

    def _probe_encoders(self) -> None:
        """The linear probes of each encoder, after the last epoch. They run without the
        stop-after-this-step handler, whose flag only the training steps check: the last epoch's
        checkpoint holds the whole training, so Ctrl-C stops them at once, and a resume runs
        them again."""
        config = self.config
        try:
            if self._stop.is_set():  # Ctrl-C during the last epoch's evaluation
                raise KeyboardInterrupt
            self.ranks.broadcast_float_buffers(self.model)
            for modality in self.modalities:
                row = linear_probe(
                    self.model,
                    modality,
                    self.train_data,
                    self.eval_data,
                    epochs=config.probe_epochs,
                    lr=config.probe_lr,
                    batch_size=config.batch_size,
                    seed=config.seed,
                    device=self.device,
                    ranks=self.ranks,
                )
                self.history.append(
                    {
                        "epoch": self.epoch,
                        "stage": config.stage,
                        "split": f"probe_{modality}",
                        **row,
                    }
                )
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"stopped during the linear probes; the checkpoint in {self.run_dir} holds the "
                "whole training: resume it to run the probes"
            ) from None

    def _train_epoch(self, loader: DataLoader) -> None:
        from tqdm.auto import tqdm

        self.model.train()
        if self.step_in_epoch == 0:  # a resumed epoch keeps the counts of its first steps
            reset_counters(self.model)
        size, batch_size = len(self.train_data), self.config.batch_size
        bar = tqdm(
            loader,
            total=batches_per_epoch(size, batch_size),
            initial=self.step_in_epoch,
            leave=False,
            disable=not self._show_progress,
            desc=f"{self.config.stage} epoch {self.epoch + 1}/{self.config.epochs}",
        )
        last = time.perf_counter()
        for batch in bar:
            global_batch = min(batch_size, size - self.step_in_epoch * batch_size)
            loss = self._record(self.ranks.gather(self._train_step(batch, global_batch)))
            self.step_in_epoch += 1
            self.global_step += 1
            now = time.perf_counter()
            self._totals["seconds"] += now - last
            last = now
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self.on_step is not None:
                self.on_step(self, self.global_step)
            if self.ranks.any(self._stop.is_set()):
                self.save_checkpoint()
                raise TrainingInterrupted(
                    f"stopped at epoch {self.epoch + 1}, step {self.step_in_epoch}; the "
                    f"checkpoint in {self.run_dir} holds everything: resume it"
                )
            if (
                self.config.checkpoint_every
                and self.global_step % self.config.checkpoint_every == 0
            ):
                self.save_checkpoint()
        bar.close()

    def _inputs(self, batch: dict) -> tuple[Tensor | None, Tensor | None, Tensor, list]:
        """(audio, visual, labels, ids) on the device; an input the stage does not use is None."""
        missing = {"label", "id", *self.modalities} - set(batch)
        if missing:
            raise KeyError(
                f"Trainer: a batch lacks {sorted(missing)}; batches are dicts with "
                f"'label', 'id' and the inputs {list(self.modalities)}"
            )
        audio, visual = (
            batch[m].to(self.device, non_blocking=True) if m in self.modalities else None
            for m in MODALITIES
        )
        if self.config.channels_last:
            audio = None if audio is None else audio.contiguous(memory_format=torch.channels_last)
            visual = (
                None if visual is None else visual.contiguous(memory_format=torch.channels_last_3d)
            )
        ids = batch["id"]  # collated int ids are a tensor
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return audio, visual, batch["label"].to(self.device), ids

    @property
    def modalities(self) -> tuple:
        """The inputs this run uses: stage 1's ``modalities``, both otherwise."""
        return self.config.modalities if self.config.stage == "stage1" else MODALITIES

    @property
    def _show_progress(self) -> bool:
        return self.ranks.is_main and progress_enabled(self.progress)

    def _train_step(self, batch: dict, global_batch: int) -> dict:
        """One optimizer step on this rank's share of a batch of ``global_batch`` samples;
        returns this rank's results for :meth:`_record` (CPU tensors, ready to gather)."""
        config = self.config
        audio, visual, labels, ids = self._inputs(batch)
        padding = not self.ranks.shard(global_batch)  # see RankBatchSampler
        autocast_dtype = AUTOCAST_DTYPES[config.precision]
        autocast = torch.autocast(
            self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        )
        if config.stage == "stage1":
            with autocast:
                heads = dict(zip(config.modalities, self._net(audio, visual)))
                loss = sum(
                    F.cross_entropy(logits, labels, reduction="sum") for logits in heads.values()
                )
        else:
            ratio_a = ratio_v = None
            if self.ratios is not None:
                ratio_a, ratio_v = self.ratios.gather(ids)
                if config.mask_target in ("input", "both"):
                    # In place is safe: the loader's default collate stacks the samples into
                    # fresh batch tensors, so the dataset's own data is never touched.
                    with torch.no_grad():
                        mask_patches(
                            audio,
                            ratio_a.to(self.device),
                            patch_size(audio.shape[-2:], config.audio_patch_grid),
                            inplace=True,
                        )
                        mask_patches(
                            visual,
                            ratio_v.to(self.device),
                            patch_size(visual.shape[-2:], config.visual_patch_grid),
                            inplace=True,
                        )
                if config.mask_target == "input":
                    ratio_a = ratio_v = None
            with autocast:
                output = self._net(audio, visual, ratio_a, ratio_v)
                loss = F.cross_entropy(output.logits, labels, reduction="sum")
            heads = dict(zip(("joint",) + MODALITIES, output))
        # DDP averages the ranks' gradients: this weight makes the average the gradient of the
        # mean loss over the whole batch, however it is split (padding weighs nothing).
        weight = 0.0 if padding else self.ranks.world_size / global_batch
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * weight).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        kept = slice(0, 0) if padding else slice(None)
        labels = labels[kept].cpu()
        result = {
            "ids": ids[kept],
            "loss": 0.0 if padding else float(loss.detach()),
            "correct": {
                name: int((logits[kept].argmax(1).cpu() == labels).sum())
                for name, logits in heads.items()
            },
        }
        if self.trackers:
            result["labels"] = labels
            # Autocast logits are bf16/fp16: confidences are computed from float32 at least.
            result["logits"] = {
                m: heads[m][kept]
                .detach()
                .cpu()
                .to(torch.promote_types(heads[m].dtype, torch.float32))
                for m in self.trackers
            }
        return result

    def _record(self, results: list[dict]) -> float:
        """Add one step's results of every rank, in rank order (the batch's order), to the
        epoch totals and the confidence trackers; returns the step's mean loss."""
        totals = self._totals
        ids = [sample_id for result in results for sample_id in result["ids"]]
        for result in results:
            totals["loss"] += result["loss"]
            for name, correct in result["correct"].items():
                totals[f"correct_{name}"] += correct
        totals["samples"] += len(ids)
        if self.trackers:
            labels = torch.cat([result["labels"] for result in results])
            for modality, tracker in self.trackers.items():
                tracker.update(ids, torch.cat([r["logits"][modality] for r in results]), labels)
        return sum(result["loss"] for result in results) / len(ids)

    def _end_epoch(self) -> None:
        totals, stage = self._totals, self.config.stage
        names = self.config.modalities if stage == "stage1" else ("joint",) + MODALITIES
        row = {
            "epoch": self.epoch + 1,
            "stage": stage,
            "split": "train",
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": totals["loss"] / totals["samples"],
        }
        row.update({accuracy_key(n): totals[f"correct_{n}"] / totals["samples"] for n in names})
        # The slowest rank's time (a collective), so that every rank holds the same history.
        row["seconds"] = max(self.ranks.gather(totals["seconds"]))
        dead_fraction = epoch_dead_fractions(self.model)
        if dead_fraction:
            row["dead_fraction"] = dead_fraction
        self.history.append(row)
        for tracker in self.trackers.values():
            tracker.end_epoch()
        if self.eval_data is not None:
            self.ranks.broadcast_float_buffers(self.model)  # evaluate rank 0's model everywhere
            started = time.perf_counter()
            evaluation = evaluate(
                self.model,
                self.eval_data,
                stage,
                self.config.batch_size,
                self.device,
                self.modalities,
                ranks=self.ranks,
            )
            self.history.append(
                {
                    "epoch": self.epoch + 1,
                    "stage": stage,
                    "split": "eval",
                    **evaluation,
                    "seconds": max(self.ranks.gather(time.perf_counter() - started)),
                }
            )
        rows = [r for r in self.history if r["epoch"] == self.epoch + 1]
        if self.ranks.is_main:
            line = epoch_line(stage, self.epoch + 1, self.config.epochs, rows)
            print_epoch_line(line, above_bar=self._show_progress)
        if self.on_epoch is not None:
            self.on_epoch(self, rows)
        self.scheduler.step()
        self.epoch += 1
        self.step_in_epoch = 0
        self._totals = self._zero_totals()
        if self.epoch == self.config.epochs and self.ranks.is_main:
            for modality, tracker in self.trackers.items():
                tracker.save(self.run_dir / f"confidence_{modality}.pt")
        self.save_checkpoint()
