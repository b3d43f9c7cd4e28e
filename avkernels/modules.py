"""``TrackedBN``: a drop-in ``nn.BatchNorm2d`` that counts dead channels inside its kernel."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from avkernels.ops.batch_norm import TrackedBNFunction

ACTIVATIONS = (None, "relu")


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

    Shape: input (N, C, H, W), output the same shape, dtype and memory format (channels_last
    stays channels_last without a copy).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        bias: bool = True,
        activation: Optional[str] = None,
        track_dead: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"TrackedBN: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        self._has_bias = bias
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        if affine and not bias:
            self.register_parameter("bias", None)
        self.activation = activation
        self.track_dead = track_dead
        counter = {"dtype": torch.long, "device": device}
        self.register_buffer("dead_count", torch.zeros(num_features, **counter), persistent=False)
        self.register_buffer(
            "dead_sample_count", torch.zeros(num_features, **counter), persistent=False
        )
        self.register_buffer("seen", torch.zeros(2, **counter), persistent=False)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.affine and self.bias is None:
            extra += ", bias=False"
        if self.activation is not None:
            extra += f", activation={self.activation!r}"
        return extra + f", track_dead={self.track_dead}"

    # -- dead-channel statistics ------------------------------------------------------------

    def reset_dead_stats(self) -> None:
        """Zero the dead-channel counters."""
        self.dead_count.zero_()
        self.dead_sample_count.zero_()
        self.seen.zero_()

    def dead_fraction(self) -> Tensor:
        """Per channel, the fraction of outputs ``<= 0`` (before the activation) seen so far.

        NaN for every channel until a forward pass has been counted.
        """
        return self.dead_count.double() / self.seen[0].double()

    def dead_sample_fraction(self) -> Tensor:
        """Per channel, the fraction of samples whose whole HxW output map was ``<= 0``."""
        return self.dead_sample_count.double() / self.seen[1].double()

    # -- forward ----------------------------------------------------------------------------

    def _abri_tensors(self) -> tuple[Optional[Tensor], ...]:
        """(abri_weight, abri_bias, abri_alpha, abri_running_mean, abri_running_var)."""
        return (None,) * 5

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_input(input)
        # Momentum and running-statistics rules exactly as nn.BatchNorm2d.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if use_batch_stats:
            size = input.shape
            if size[0] * size[2] * size[3] == 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {size}"
                )
        keep_running = not self.training or self.track_running_stats
        abri_weight, abri_bias, abri_alpha, abri_mean, abri_var = self._abri_tensors()
        dead = (self.dead_count, self.dead_sample_count, self.seen) if self.track_dead else (None,) * 3
        return TrackedBNFunction.apply(
            input,
            self.weight,
            self.bias,
            abri_weight,
            abri_bias,
            abri_alpha,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            abri_mean if keep_running else None,
            abri_var if keep_running else None,
            *dead,
            use_batch_stats,
            factor,
            self.eps,
            self.activation == "relu",
        )

    def _check_input(self, input: Tensor) -> None:
        if not input.is_floating_point():
            raise TypeError(
                f"TrackedBN expects a floating-point input, got {input.dtype}; "
                "convert it with input.float()"
            )
        reference = self.weight if self.weight is not None else self.running_mean
        if reference is not None and input.device != reference.device:
            raise RuntimeError(
                f"TrackedBN: input is on {input.device} but the layer is on {reference.device}; "
                f"move one of them (e.g. module.to({str(input.device)!r}))"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"TrackedBN: expected {self.num_features} channels (dim 1) but the input has "
                f"shape {tuple(input.shape)}"
            )
