"""The avkernels research application, built on the library's public API only: AV datasets and
their importers (:mod:`.data`), the audio-visual models (:mod:`.models`), the resumable FusT
trainer (:mod:`.training`), the demo (:mod:`.demo`) and the ``avkernels`` command line
(:mod:`.cli`, one module a sub-command in :mod:`.commands`; documented in docs/cli.md)."""
