"""One small training loop for FusT and its baseline (plain PyTorch), resumable bit for bit.

The public surface is what this package exports: :class:`Trainer` (one run),
:class:`TrainConfig` (everything that defines it) and its names (:data:`STAGES`,
:data:`MODALITIES`, :data:`CHOICES`), :class:`TrainingInterrupted`, the files of a run
directory (:data:`CHECKPOINT`, :data:`CONFIG`, :data:`MODEL`), :func:`evaluate` and
:func:`linear_probe`, :func:`patch_size`, and the process helpers :func:`training_device` and
:func:`torchrun_process_group` (the ranks themselves are :class:`avkernels.distributed.Ranks`).

Modules: ``config`` (TrainConfig and its validation), ``sampling`` (the epoch and per-rank
batch samplers, seeds), ``rng`` (the global RNG state), ``processes`` (device and torchrun),
``model_setup`` (model, optimizer, schedule, mask ratios, the stage's forward module),
``run_files`` (what a run directory holds), ``evaluation`` (evaluation, features, linear
probes) and ``trainer`` (the loop and its checkpoints).

Stages (:attr:`TrainConfig.stage`):

``"stage1"``  FusT stage 1: each encoder fine-tuned alone with its own head (``audio_fc``,
              ``visual_fc``; the two branches share no parameter, so one loop trains both
              independently), recording every epoch each training sample's confidence with a
              :class:`~avkernels.fust.ConfidenceTracker` per modality; written as
              ``confidence_audio.pt`` / ``confidence_visual.pt`` in the run directory.
``"stage2"``  FusT stage 2: joint training from the stage-1 encoders (``init_from``), cross
              entropy on the joint logits, with the per-sample mask ratios of
              :func:`~avkernels.fust.mask_ratios` (joined by sample id) applied to the inputs
              (:func:`~avkernels.mask_patches`, the official operator), to the fused features
              (:class:`~avkernels.MaskedConcatFusion`), or both (``mask_target``).
``"joint"``   naive joint training (the baseline): the same without masking.

Batches: dicts with ``"audio"`` (B, 1, frames, mel) float, ``"visual"`` (B, C, T, H, W) float,
``"label"`` (B,) int64, ``"id"`` list of sample ids.

Run directory: ``config.json``; ``checkpoint.pt`` (everything needed to resume: model,
optimizer, scheduler, RNG states of torch/numpy/python (``rng``; ``rng_other_ranks``: those of
ranks 1.. under several processes), epoch and step, confidence trackers, running epoch totals,
every rank's dead-channel counters of the epoch so far (``dead_counters``), metrics history;
written atomically at every epoch end, every
``checkpoint_every`` steps and when a stop is requested, e.g. by Ctrl-C); ``metrics.jsonl`` and
``metrics.csv`` (one row per epoch and split, rewritten from the checkpointed history so a
resumed run never duplicates a row; each row names its ``stage`` and holds the epoch's wall time
``seconds``, the train rows also each BN layer's mean ``dead_fraction``: docs/cli.md, "Watching
a run"); ``model.pt`` (the final model state dict). A resumed run reproduces every figure but
the wall times.

Reproducibility: the order of the data in epoch ``e`` is a function of ``(seed, e)`` only (no
generator state to carry), and the DataLoader gets a generator seeded the same way, so workers
are seeded identically. A training dataset with ``set_epoch(seed, epoch)`` is told the epoch
before it starts; ``AVDataset`` then draws item ``i``'s augmentation from
``sampling.sample_seed(seed, e, i)``, the same on every rank, in every worker and after a
resume. A run resumed from any checkpoint equals the uninterrupted run bit for bit on CPU when
the dataset's randomness, if any, comes from that seed, or from torch's global generator with
``num_workers=0`` (then it is in the checkpointed RNG state); with worker processes and
global-RNG augmentation, resuming at an epoch boundary is exact and resuming mid-epoch is not.

Several processes (``torchrun``, see :func:`torchrun_process_group`): a Trainer built while a
``torch.distributed`` process group is initialised trains with ``DistributedDataParallel``.
``batch_size`` stays the *global* batch: every rank walks the same epoch permutation and takes
its contiguous share of each batch (``sampling.RankBatchSampler``), and the loss of a rank is
its samples' cross-entropy sum times ``world_size / global batch``, so that DDP's gradient
average is the one-process gradient of the whole batch. The per-step results (confidences,
accuracy, loss) are gathered from every rank in rank order, i.e. in the batch's order, into
identical trackers and totals on every rank, so nothing is lost or counted twice. With
``sync_bn=True`` the BN layers normalise with the statistics of the whole global batch, and N
processes compute what one process computes with the same config (up to floating-point
rounding): same model, same confidences per sample. With per-rank BN (the default, as in the
official code) each rank normalises its share alone. Rank 0 alone writes files and shows
progress; checkpoints hold each rank's RNG state and every rank loads them on resume (exact
with the same number of processes). Evaluation and the probes' features are computed on shards
and summed/gathered, every rank taking part. A short last batch with fewer samples than ranks
gives the ranks without a share one padding sample each, weighted 0 and not recorded (it still
enters synced BN statistics).
"""

from avkernels.app.training.config import CHOICES, MODALITIES, STAGES, TrainConfig, patch_size
from avkernels.app.training.evaluation import evaluate, linear_probe
from avkernels.app.training.processes import torchrun_process_group, training_device
from avkernels.app.training.run_files import CHECKPOINT, CONFIG, MODEL
from avkernels.app.training.stopping import TrainingInterrupted
from avkernels.app.training.trainer import Trainer

__all__ = [
    "CHECKPOINT",
    "CHOICES",
    "CONFIG",
    "MODALITIES",
    "MODEL",
    "STAGES",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "evaluate",
    "linear_probe",
    "patch_size",
    "torchrun_process_group",
    "training_device",
]
