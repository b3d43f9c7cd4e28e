"""Swap ``nn.BatchNorm2d`` layers for ``TrackedBN`` and back, sharing parameters and buffers."""

from __future__ import annotations

from torch import nn

from avkernels.nn.tracked_bn import TrackedBN
from avkernels.ops.batch_norm.sync import check_process_group

_SHARED_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# TrackedBN options convert() may set; the BatchNorm2d settings come from each converted layer.
CONVERT_OPTIONS = {"activation", "track_dead", "sync", "process_group"}
# Options about how the model runs across processes rather than what a layer computes: convert()
# also sets them on layers that already are TrackedBN (e.g. ABRi layers).
MODEL_WIDE_OPTIONS = ("sync", "process_group")
# nn.Module's hook registries: the new layer takes over the very dicts, so that hooks registered on
# the old layer run on the new one and their handles still remove them.
_HOOK_REGISTRIES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _move_state(source: nn.BatchNorm2d, target: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Give ``target`` the very Parameter and buffer objects of ``source`` (no copies), and its
    hooks."""
    for name in _SHARED_STATE:
        value = getattr(source, name, None)
        if name in source._parameters:
            target._parameters[name] = value
        elif name in source._buffers:
            target._buffers[name] = value
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    for name in _HOOK_REGISTRIES:
        setattr(target, name, getattr(source, name))
    return target


def convert(module: nn.Module, **kwargs: object) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by :class:`TrackedBN`; return the new root.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: the new layers reuse the same Parameter
    and buffer objects, so optimizers built before the conversion keep working, and keep the hooks
    registered on each layer (forward, backward, state-dict; their handles still remove them).
    ``kwargs`` go to ``TrackedBN`` (``activation``, ``track_dead``, ``sync``,
    ``process_group``). Layers that already are TrackedBN are kept, with ``sync``/``process_group``
    set on them when given: ``convert(model, sync=True)`` synchronises every TrackedBN of the
    model, ABRi layers included (see :mod:`avkernels.distributed`).
    """
    unknown = set(kwargs) - CONVERT_OPTIONS
    if unknown:
        raise TypeError(
            f"convert() got unexpected options {sorted(unknown)}; it takes "
            f"{sorted(CONVERT_OPTIONS)} (the other BatchNorm2d settings come from each layer)"
        )
    check_process_group(kwargs.get("process_group"), "convert()")
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, TrackedBN):
        reference = module.weight if module.affine else module.running_mean
        tracked = TrackedBN(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=None if reference is None else reference.device,
            **kwargs,
        )
        return _move_state(module, tracked)
    if isinstance(module, TrackedBN):
        for option in MODEL_WIDE_OPTIONS:
            if option in kwargs:
                setattr(module, option, kwargs[option])
        return module
    for name, child in module.named_children():
        converted = convert(child, **kwargs)
        if converted is not child:
            module.add_module(name, converted)
    return module


def revert(module: nn.Module) -> nn.Module:
    """Turn every :class:`TrackedBN` of ``module`` back into ``nn.BatchNorm2d``; return the root.

    Like :func:`convert`, the new layers reuse the Parameter and buffer objects and keep the hooks.

    A layer with ``sync=True`` becomes ``nn.SyncBatchNorm`` with the same ``process_group``,
    so the model keeps normalising with the statistics of the whole distributed batch (PyTorch's
    SyncBatchNorm synchronises CUDA tensors only). Raises ``ValueError`` for layers a plain
    BatchNorm2d cannot represent: a fused activation or (for ABRi) a second BN, which
    ``avkernels.abri.fold`` merges instead.
    """
    if isinstance(module, TrackedBN):
        if module.activation is not None:
            raise ValueError(
                f"cannot revert a TrackedBN with activation={module.activation!r}: "
                "nn.BatchNorm2d has no fused activation; set layer.activation = None and add "
                "an nn.ReLU after it first"
            )
        if module.affine and module.bias is None:
            raise ValueError(
                "cannot revert a TrackedBN built with bias=False: nn.BatchNorm2d always has a bias"
            )
        if module.abri_enabled:
            raise ValueError(
                "cannot revert an ABRi layer to one nn.BatchNorm2d; use avkernels.abri.fold(model)"
            )
        reference = module.weight if module.affine else module.running_mean
        settings = dict(
            num_features=module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device=None if reference is None else reference.device,
        )
        layer = (
            nn.SyncBatchNorm(process_group=module.process_group, **settings)
            if module.sync
            else nn.BatchNorm2d(**settings)
        )
        return _move_state(module, layer)
    for name, child in module.named_children():
        reverted = revert(child)
        if reverted is not child:
            module.add_module(name, reverted)
    return module
