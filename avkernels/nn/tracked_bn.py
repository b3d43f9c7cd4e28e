"""``TrackedBN``: a drop-in ``nn.BatchNorm2d`` that counts dead channels inside its kernel."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn import functional as F

from avkernels.functional import ACTIVATIONS, AbriState, DeadStats, tracked_batch_norm
from avkernels.ops.batch_norm.sync import check_process_group, sync_enabled
from avkernels.ops.checks import UnsupportedDtypeError

ABRI_GRANULARITIES = ("layer", "channel")
# ABRi's added BN and blend weight: registered (persistent) only while ABRi is on.
ABRI_STATE = (
    "abri_weight",
    "abri_bias",
    "abri_alpha",
    "abri_running_mean",
    "abri_running_var",
    "abri_num_batches_tracked",
)


def _exporting_to_onnx() -> bool:
    """Inside ``torch.onnx.export``, either exporter (it traces, or compiles with dynamo=True).

    ``is_in_onnx_export`` alone costs about 1.7 us a call; the tracing checks cost 0.3 us.
    """
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    return tracing and torch.onnx.is_in_onnx_export()


@torch.fx.node.has_side_effect
@torch.fx.wrap
def _count_training_batch(input: Tensor, batch_counters: list[Tensor]) -> None:
    """Add 1 to each counter. A function of the input, so that torch.fx records the call in a
    traced graph (the buffers alone are not traced values); kept by dead-code elimination."""
    for counter in batch_counters:
        counter.add_(1)


class TrackedBN(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with a fused ReLU option and in-kernel dead-channel statistics.

    Behaves exactly like ``nn.BatchNorm2d`` (same arguments, state_dict keys, running-statistics
    rules and errors) and adds:

    Args:
        bias: ``False`` drops the learnable shift (``self.bias`` is ``None``), keeping the scale.
        activation: ``"relu"`` applies ReLU in the same kernel (forward and backward).
        track_dead: count, in train and in eval, the outputs ``<= 0`` before the activation and
            the samples whose whole HxW map is ``<= 0``, per channel. Read them with
            :meth:`dead_fraction` and :meth:`dead_sample_fraction`; clear with
            :meth:`reset_dead_stats`. The counters are non-persistent int64 buffers
            (``dead_count``, ``dead_sample_count``, ``seen`` = [elements per channel, samples]).
        sync: in training, normalise with the statistics of the whole batch spread over the
            ranks of ``process_group`` (``nn.SyncBatchNorm``'s protocol, see
            :mod:`avkernels.ops.batch_norm.sync`), dead counts included: after each training
            step's ``backward()`` (at once for a forward without autograd) every rank holds the
            global counts.
            Runs locally while ``torch.distributed`` is not initialised or the group has one
            rank; eval forwards never communicate.
        process_group: the ``torch.distributed`` group to synchronise over; ``None`` is the
            default (world) group.

    ABRi (Adaptive BatchNorm Re-initialization): :meth:`enable_abri` adds a freshly initialised
    BN next to this one and blends the two, ``y = a * BN_orig(x) + (1 - a) * BN_new(x)``, at the
    cost of one BN (same kernels; the fused ReLU and the dead counters see the blended output).

    Shape: input (N, C, H, W), output the same shape, dtype and memory format (channels_last
    stays channels_last without a copy).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        activation: str | None = None,
        track_dead: bool = True,
        process_group: ProcessGroup | None = None,
        sync: bool = False,
    ) -> None:
        check_process_group(process_group, "TrackedBN")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"TrackedBN: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        if affine and not bias:
            self.register_parameter("bias", None)
        self.activation = activation
        self.track_dead = track_dead
        self.sync = sync
        self.process_group = process_group
        self.abri_granularity: str | None = None
        self.abri_alpha_init: float | None = None
        counter = {"dtype": torch.long, "device": device}
        self.register_buffer("dead_count", torch.zeros(num_features, **counter), persistent=False)
        self.register_buffer(
            "dead_sample_count", torch.zeros(num_features, **counter), persistent=False
        )
        self.register_buffer("seen", torch.zeros(2, **counter), persistent=False)

    def reset_parameters(self) -> None:
        """Reset the running statistics (as nn.BatchNorm2d does); gamma to 1, beta to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        """nn.BatchNorm2d's fields; then bias, activation, ABRi, sync where set; track_dead."""
        extra = super().extra_repr()
        if self.affine and self.bias is None:
            extra += ", bias=False"
        if self.activation is not None:
            extra += f", activation={self.activation!r}"
        if self.abri_enabled:
            extra += f", abri={self.abri_granularity!r}"
        if self.sync:
            extra += ", sync=True"
        return extra + f", track_dead={self.track_dead}"

    # -- ABRi -------------------------------------------------------------------------------

    @property
    def abri_enabled(self) -> bool:
        """Whether :meth:`enable_abri` has added the ABRi branch."""
        return self.abri_granularity is not None

    def enable_abri(self, alpha: float = 0.5, granularity: str = "layer") -> TrackedBN:
        """Turn this layer into an ABRi layer; return ``self``.

        The existing ``weight``/``bias``/running statistics stay the original (pre-trained) BN.
        The added BN gets parameters ``abri_weight`` (ones) and ``abri_bias`` (zeros, absent when
        the layer has no bias), buffers ``abri_running_mean`` (zeros), ``abri_running_var`` (ones)
        and ``abri_num_batches_tracked`` (absent without running statistics). The blend weight
        ``abri_alpha`` is a learnable, unconstrained parameter filled with ``alpha``, of shape (1,)
        for ``granularity="layer"`` or (C,) for ``"channel"``. The new tensors are persistent
        state; a plain-BN state dict loaded later re-initialises them as here. Build the optimizer
        after this call: it must see the new parameters.
        """
        if granularity not in ABRI_GRANULARITIES:
            raise ValueError(
                f"TrackedBN.enable_abri: granularity must be one of {ABRI_GRANULARITIES}, "
                f"got {granularity!r}"
            )
        if not self.affine:
            raise ValueError(
                "TrackedBN.enable_abri: ABRi blends two affine BNs; this layer was built with "
                "affine=False"
            )
        if self.abri_enabled:
            raise RuntimeError("TrackedBN.enable_abri: ABRi is already enabled on this layer")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):  # NaN fails too
            raise ValueError(
                f"TrackedBN.enable_abri: alpha is the initial blend weight of the two BNs, a "
                f"number in [0, 1], got {alpha!r}"
            )
        channels = self.num_features
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.abri_weight = nn.Parameter(torch.empty(channels, **factory))
        bias = None if self.bias is None else nn.Parameter(torch.empty(channels, **factory))
        self.register_parameter("abri_bias", bias)
        alpha_shape = 1 if granularity == "layer" else channels
        self.abri_alpha = nn.Parameter(torch.empty(alpha_shape, **factory))
        for name, like in (
            ("abri_running_mean", self.running_mean),
            ("abri_running_var", self.running_var),
            ("abri_num_batches_tracked", self.num_batches_tracked),
        ):
            self.register_buffer(name, None if like is None else torch.empty_like(like))
        self.abri_granularity = granularity
        self.abri_alpha_init = float(alpha)
        self.reset_abri_parameters()
        return self

    @torch.no_grad()
    def reset_abri_parameters(self) -> None:
        """Re-initialise ABRi's added BN (1, 0, running 0/1) and fill ``abri_alpha`` with its
        initial value."""
        self.abri_weight.fill_(1)
        self.abri_alpha.fill_(self.abri_alpha_init)
        for name, value in (
            ("abri_bias", 0),
            ("abri_running_mean", 0),
            ("abri_running_var", 1),
            ("abri_num_batches_tracked", 0),
        ):
            tensor = getattr(self, name)
            if tensor is not None:
                tensor.fill_(value)

    def _abri_state_names(self) -> list[str]:
        """Names of the ABRi tensors this layer holds (empty while ABRi is off)."""
        if not self.abri_enabled:
            return []
        return [name for name in ABRI_STATE if getattr(self, name) is not None]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        abri_keys = [prefix + name for name in self._abri_state_names()]
        if abri_keys and not any(key in state_dict for key in abri_keys):
            # A plain-BN checkpoint: it is the original BN; the added one starts fresh.
            missing_keys[:] = [key for key in missing_keys if key not in abri_keys]
            self.reset_abri_parameters()

    # -- dead-channel statistics ------------------------------------------------------------

    def reset_dead_stats(self) -> None:
        """Zero the dead-channel counters."""
        self.dead_count.zero_()
        self.dead_sample_count.zero_()
        self.seen.zero_()

    def _dead_stats(self) -> DeadStats:
        """The counters for the op, int64 again if a buffer was recreated in another dtype.

        PyTorch's own module tests recreate every buffer with ``.to(dtype)``, the integer ones
        included; the counts survive exactly as long as that dtype holds them.
        """
        counters = DeadStats(self.dead_count, self.dead_sample_count, self.seen)
        if all(counter.dtype == torch.long for counter in counters):
            return counters
        counters = DeadStats(*(counter.round().long() for counter in counters))
        for name, counter in zip(DeadStats._fields, counters):
            setattr(self, name, counter)
        return counters

    def dead_fraction(self) -> Tensor:
        """Per channel, the fraction of outputs ``<= 0`` (before the activation) seen so far.

        NaN for every channel until a forward pass has been counted.
        """
        return self.dead_count.double() / self.seen[0].double()

    def dead_sample_fraction(self) -> Tensor:
        """Per channel, the fraction of samples whose whole HxW output map was ``<= 0``."""
        return self.dead_sample_count.double() / self.seen[1].double()

    # -- forward ----------------------------------------------------------------------------

    def __prepare_scriptable__(self) -> TrackedBN:
        """Called by ``torch.jit.script`` on every submodule: refuse with the way out."""
        raise RuntimeError(
            "torch.jit.script cannot compile TrackedBN: its forward dispatches in Python "
            "(dead-channel counters, ABRi, synchronisation). Script the model after "
            "avkernels.revert(model) (plain nn.BatchNorm2d; fold ABRi layers with "
            "avkernels.abri.fold first), or use torch.compile, torch.fx or torch.onnx.export, "
            "which support TrackedBN"
        )

    def forward(self, input: Tensor) -> Tensor:
        """nn.BatchNorm2d of ``input`` (N, C, H, W); counts dead outputs when ``track_dead``."""
        if _exporting_to_onnx():
            return self._export_forward(input)
        # Each parameter and buffer is read once: nn.Module.__getattr__ costs about 1 us a read
        # here, as much as a small layer's Python overhead budget.
        weight, bias = self.weight, self.bias
        running_mean, running_var = self.running_mean, self.running_var
        # torch.fx traces values, so Python checks on the input cannot run while tracing; the op
        # checks its arguments again (docs/DESIGN.md, "PyTorch conventions").
        checking = not is_fx_symbolic_tracing()
        if checking:
            self._check_input_dim(input)
            self._check_input(input, weight if weight is not None else running_mean)
        # Momentum and running-statistics rules exactly as nn.BatchNorm2d.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        num_batches_tracked = self.num_batches_tracked
        counting = self.training and self.track_running_stats and num_batches_tracked is not None
        if counting:
            batch_counters = [num_batches_tracked]
            if self.abri_enabled:
                batch_counters.append(self.abri_num_batches_tracked)
            _count_training_batch(input, batch_counters)
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        # Synced layers check the global batch size instead (inside the sync path).
        synced = self.sync and self.training and sync_enabled(self.process_group)
        keep_running = not self.training or self.track_running_stats
        if not keep_running:
            running_mean = running_var = None
        abri = None
        if self.abri_enabled:
            abri = AbriState(
                self.abri_weight,
                self.abri_bias,
                self.abri_alpha,
                self.abri_running_mean if keep_running else None,
                self.abri_running_var if keep_running else None,
            )
        cumulative = counting and self.momentum is None
        if cumulative and not checking:
            raise RuntimeError(
                "torch.fx cannot trace TrackedBN(momentum=None) in training mode (the cumulative "
                "average is computed outside the op); trace the model in eval mode, or with a "
                "Tracer whose is_leaf_module keeps nn.BatchNorm2d layers as leaves"
            )
        if cumulative:
            # Cumulative averages over each BN's own batch count, as nn.BatchNorm2d keeps them:
            # the kernel writes this batch's statistics (momentum 1 on copies), averaged below with
            # tensor arithmetic (1 / num_batches_tracked as a Python float is a data-dependent
            # scalar that torch.compile(fullgraph=True) cannot pass to the op).
            # Copies, not zeros: an empty batch leaves them (and so the averages) unchanged.
            running_mean, running_var = running_mean.clone(), running_var.clone()
            factor = 1.0
            if abri is not None:
                abri = abri._replace(running_mean=None, running_var=None)
        dead = self._dead_stats() if self.track_dead else None
        output = tracked_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training=use_batch_stats,
            momentum=factor,
            eps=self.eps,
            activation=self.activation,
            dead_stats=dead,
            abri=abri,
            process_group=(self.process_group or dist.group.WORLD) if synced else None,
        )
        if cumulative:
            self._average_running_stats(running_mean, running_var)
        return output

    def _export_forward(self, input: Tensor) -> Tensor:
        """The eval forward as ``batch_norm`` (+ ``relu``), which the ONNX exporters write as
        BatchNormalization (+ Relu); an inference graph has no use for dead counts."""
        if self.training:
            raise RuntimeError(
                "TrackedBN: ONNX export supports eval mode only (the dead-channel counters have "
                "no ONNX equivalent); export with training=torch.onnx.TrainingMode.EVAL, the "
                "default, or call model.eval() first"
            )

        def normalise(weight, bias, running_mean, running_var):
            batch_stats = running_mean is None
            return F.batch_norm(
                input, running_mean, running_var, weight, bias, batch_stats, 0.0, self.eps
            )

        output = normalise(self.weight, self.bias, self.running_mean, self.running_var)
        if self.abri_enabled:
            added = normalise(
                self.abri_weight, self.abri_bias, self.abri_running_mean, self.abri_running_var
            )
            alpha = self.abri_alpha.view(-1, 1, 1)
            output = alpha * output + (1 - alpha) * added
        return output if self.activation is None else F.relu(output)

    @torch.no_grad()
    def _average_running_stats(self, batch_mean: Tensor, batch_var: Tensor) -> None:
        """Fold one batch's statistics into the running set(s) with weight 1 / batch count
        (momentum=None)."""
        running_sets = [(self.running_mean, self.running_var, self.num_batches_tracked)]
        if self.abri_enabled:
            running_sets.append(
                (self.abri_running_mean, self.abri_running_var, self.abri_num_batches_tracked)
            )
        for mean, var, count in running_sets:
            # 1 / count in float64, rounded once to the statistics' dtype (nn.BatchNorm2d's
            # factor is a Python float).
            weight = count.double().reciprocal().to(mean.dtype)
            mean.lerp_(batch_mean, weight)
            var.lerp_(batch_var, weight)

    def _check_input(self, input: Tensor, reference: Tensor | None) -> None:
        """Dtype, channels, and device against ``reference`` (a parameter or buffer)."""
        if not input.is_floating_point():
            raise UnsupportedDtypeError(
                f"TrackedBN expects a floating-point input, got {input.dtype}; "
                "convert it with input.float()"
            )
        if reference is not None and input.device != reference.device:
            raise RuntimeError(
                f"TrackedBN: input is on {input.device} but the layer is on {reference.device}; "
                f"move one of them (e.g. module.to({str(input.device)!r}))"
            )
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"TrackedBN: expected {self.num_features} channels (dim 1) but the input has "
                f"shape {tuple(input.shape)}"
            )
