"""Sub-commands of the ``avkernels`` CLI (see ``avkernels.cli``)."""
