"""The avkernels research application, built on the library's public API only: AV datasets and
their importers (:mod:`.data`), the audio-visual models (:mod:`.models`), the resumable FusT
trainer, the demo and the ``avkernels`` command line (:mod:`.cli`)."""
