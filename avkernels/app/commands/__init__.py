"""Sub-commands of the ``avkernels`` CLI (see ``avkernels.app.cli``)."""
