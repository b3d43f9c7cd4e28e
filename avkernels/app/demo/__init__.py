"""The ``avkernels demo`` pipeline: the paper's story end to end on AV-Digits, as a report.

Modules: ``settings`` (the sizes of a run), ``context`` (one run's state and its training runs),
``steps`` (the four steps and the data), ``figures`` (the plots), ``findings`` (comparisons
worded from the numbers), ``report`` (the report files) and ``run`` (:func:`run_demo`).

Steps (each a function that returns its section of the report and caches it, so re-running
with the same output folder skips finished steps and resumes an interrupted training run):

1. ``pretrain``: a source ResNet-18 trained on the visual modality alone (FusT stage 1 with
   ``modalities=("visual",)``); its encoder is saved as ``source/visual_encoder.pt``.
2. ``transfer``: the audio encoder initialised from that visual encoder (RGB stem summed to one
   channel); dead-channel diagnosis on audio inputs before and after fine-tuning; audio
   fine-tuning from random init vs pre-trained vs pre-trained + ABRi.
3. ``fust``: FusT stage 1 (each encoder alone from the same initial weights: visual from the
   source, audio random), the per-sample confidences and the mask ratios they give, stage 2
   against naive joint training given as many epochs as stage 1 + stage 2, with each
   encoder's linear-probe accuracy.
4. ``kernels``: TrackedBN against ``nn.BatchNorm2d``, training step (forward + backward) time
   ratio on a few shapes, measured in the run.

Every training run goes through :class:`avkernels.app.training.Trainer` (``OUT/runs/<name>``), so
progress bars, checkpoints and resume behave as in ``avkernels train``. Every number of the
report is measured in the run that wrote it; ``report.json`` holds them all, ``report.md`` and
``report.html`` (plots inline, base64 PNG; the Markdown rendered by the ``markdown`` package)
present them.

The inputs are decoded once per split with the evaluation front end (no random crop) and
kept in memory: the CPU budget goes to training, not to decoding. Everything runs on the CPU
with one torch thread (the models are small; on a shared 2-core machine one thread is several
times faster than two contending ones).
"""

from avkernels.app.demo.run import run_demo
from avkernels.app.demo.settings import DemoError, DemoSettings, settings

__all__ = ["DemoError", "DemoSettings", "run_demo", "settings"]
