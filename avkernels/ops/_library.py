"""One definition of each ``avkernels::`` op: its argument table, from which its schema string and
its Python argument record are both built.

Every op is defined here, from Python, whether or not the compiled extension is present; the
extension (``csrc/``) only registers kernels for ops defined here (``TORCH_LIBRARY_IMPL``), and
the dispatcher checks each C++ kernel's signature against the schema when both are registered.
So the argument list of an op is written once: in its :class:`OpSignature`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

NAMESPACE = "avkernels"

# Holds the definitions (and the Python kernels registered on them) for the life of the process.
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


@dataclass(frozen=True)
class OpSignature:
    """An op's name, its arguments as ``(name, schema type)`` pairs in order, and its return type.

    ``schema`` is the dispatcher schema; ``record`` a ``NamedTuple`` class with one field per
    argument, which the Python kernels build from the positional call (``Args(*args)``) and read
    by name.
    """

    name: str
    arguments: tuple[tuple[str, str], ...]
    returns: str

    @property
    def schema(self) -> str:
        listed = ", ".join(f"{kind} {name}" for name, kind in self.arguments)
        return f"{self.name}({listed}) -> {self.returns}"

    @property
    def argument_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.arguments)

    @functools.cached_property
    def record(self) -> type[NamedTuple]:
        record = NamedTuple(_camel(self.name) + "Args", [(n, Any) for n in self.argument_names])
        record.__doc__ = f"The arguments of ``{NAMESPACE}::{self.schema}``, by name."
        return record

    def renamed(self, name: str, returns: str) -> OpSignature:
        """The same arguments under another op name and return type."""
        return OpSignature(name, self.arguments, returns)


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def define_op(signature: OpSignature) -> torch._ops.OpOverload:
    """Define ``avkernels::<name>`` and return its overload."""
    _LIBRARY.define(signature.schema)
    return getattr(getattr(torch.ops, NAMESPACE), signature.name).default


def register_python_kernels(signature: OpSignature, kernels: Mapping[str, Callable]) -> None:
    """Register Python ``kernels`` (dispatch key, e.g. ``"CPU"``, to kernel) for the op."""
    for dispatch_key, kernel in kernels.items():
        _LIBRARY.impl(signature.name, kernel, dispatch_key)


def launch_directly(kernel: Callable) -> Callable:
    """A Triton kernel as eager calls launch it; traced calls pass ``torch.library.wrap_triton``
    in its place (see :func:`register_inductor_decomposition`)."""
    return kernel


def register_inductor_decomposition(signature: OpSignature, traced_cuda_kernel: Callable) -> None:
    """Let AOTAutograd trace the op's CUDA kernel instead of keeping the op opaque.

    ``traced_cuda_kernel`` launches its Triton kernels through ``torch.library.wrap_triton``; it
    runs when the op is called under AOTAutograd's ``FunctionalTensorMode`` on CUDA tensors, so
    Inductor sees the kernels as user-defined Triton kernels and schedules around them (what
    ``torch.library.triton_op`` does, on an op that keeps its C++ CPU and autograd kernels;
    docs/DESIGN.md, "PyTorch conventions"). Other devices, and ``torch.export``, keep the op.
    """
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def decompose_on_cuda(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if args[0].device.type != "cuda" or custom_triton_ops_decomposition_disabled():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return traced_cuda_kernel(*args, **kwargs)

    torch.library.register_torch_dispatch(
        f"{NAMESPACE}::{signature.name}", FunctionalTensorMode, decompose_on_cuda, lib=_LIBRARY
    )
