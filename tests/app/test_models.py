"""ResNet encoders (against torchvision), checkpoint loading in every layout, AVClassifier
shapes and the (T, C) vs (C, T) guard."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")

from avkernels import TrackedBN, abri  # noqa: E402
from avkernels.app.models import (  # noqa: E402
    AVClassifier,
    ResNetEncoder,
    adapt_first_conv,
    load_encoder,
)
from avkernels.checkpoints import CheckpointError  # noqa: E402


def torchvision_trunk(model: nn.Module) -> nn.Module:
    """torchvision's ResNet without avgpool and fc: the reference feature extractor."""
    return nn.Sequential(*list(model.children())[:-2])


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN parameters and statistics, so a wrong mapping cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.weight, module.bias, module.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
                module.running_var.copy_(
                    torch.rand(module.running_var.shape, generator=generator) + 0.5
                )
    return model


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
@pytest.mark.parametrize("fuse_relu", [True, False])
def test_encoder_matches_torchvision_on_its_checkpoint(arch, fuse_relu):
    torch.manual_seed(0)
    reference = randomised(getattr(torchvision.models, arch)())
    encoder = load_encoder(ResNetEncoder(arch, 3, fuse_relu=fuse_relu), reference.state_dict())
    x = torch.randn(4, 3, 64, 64)
    # Batch statistics (train mode) are reduced in another order than PyTorch's: float32
    # rounding differences grow over 20 layers, hence the looser tolerance there.
    for train, tolerance in ((False, 1e-5), (True, 5e-4)):
        reference.train(train), encoder.train(train)
        torch.testing.assert_close(
            encoder(x), torchvision_trunk(reference)(x), rtol=tolerance, atol=tolerance
        )


def test_encoder_layout_fused_relu_and_width():
    encoder = ResNetEncoder("resnet18", 1, width=8)
    assert encoder.out_features == 64 and encoder.conv1.in_channels == 1
    assert encoder.bn1.activation == "relu" and encoder.layer1[0].bn1.activation == "relu"
    # bn2 feeds the residual sum and the downsample BN the identity path: no ReLU of their own
    assert encoder.layer1[0].bn2.activation is None
    assert encoder.layer2[0].downsample[1].activation is None
    assert all(isinstance(m, TrackedBN) for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
    assert encoder(torch.randn(2, 1, 64, 32)).shape == (2, 64, 2, 1)
    keys = set(ResNetEncoder("resnet18", 3).state_dict())
    assert keys == set(torchvision.models.resnet18().state_dict()) - {"fc.weight", "fc.bias"}


def test_imagenet_checkpoint_file_loads_with_fc_dropped(tmp_path, caplog):
    reference = torchvision.models.resnet18()
    torch.save({"model": reference.state_dict()}, tmp_path / "imagenet.pth")
    encoder = ResNetEncoder("resnet18", 3)
    with caplog.at_level(logging.INFO, logger="avkernels.app.models"):
        load_encoder(encoder, tmp_path / "imagenet.pth")
    assert "fc.weight" in caplog.text
    assert torch.equal(encoder.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_adapt_first_conv_moves_rgb_weights_to_one_channel(mode, caplog):
    torch.manual_seed(0)
    reference = randomised(torchvision.models.resnet18()).eval()
    encoder = ResNetEncoder("resnet18", 1).eval()
    with caplog.at_level(logging.INFO, logger="avkernels.app.models"):
        load_encoder(encoder, reference.state_dict(), adapt=mode)
    assert mode in caplog.text
    stem = reference.conv1.weight
    expected = stem.sum(1, keepdim=True) if mode == "sum" else stem.mean(1, keepdim=True)
    assert torch.equal(encoder.conv1.weight, expected)
    if mode == "sum":  # a grey image gives the RGB network's output
        grey = torch.randn(1, 1, 32, 32)
        torch.testing.assert_close(
            encoder(grey),
            torchvision_trunk(reference)(grey.expand(-1, 3, -1, -1)),
            rtol=1e-4,
            atol=1e-4,
        )


def test_loading_errors_name_the_problem():
    state_dict = torchvision.models.resnet18().state_dict()
    with pytest.raises(ValueError, match="adapt='sum' or 'mean'"):
        load_encoder(ResNetEncoder("resnet18", 1), state_dict)
    with pytest.raises(CheckpointError, match="missing layer1.0.conv1.weight"):
        load_encoder(
            ResNetEncoder("resnet18", 3),
            {k: v for k, v in state_dict.items() if k != "layer1.0.conv1.weight"},
        )
    with pytest.raises(CheckpointError, match="unexpected layer1.2.*those of a resnet34"):
        load_encoder(ResNetEncoder("resnet18", 3), torchvision.models.resnet34().state_dict())
    with pytest.raises(ValueError, match="shape mismatch"):
        load_encoder(ResNetEncoder("resnet18", 3, width=32), state_dict)
    with pytest.raises(CheckpointError, match="weights.pth: no such file"):
        load_encoder(ResNetEncoder("resnet18", 3), "/nonexistent/weights.pth")
    with pytest.raises(ValueError, match="adapt_first_conv: mode"):
        adapt_first_conv(state_dict["conv1.weight"], 1, "max")


def test_official_abri_checkpoint_turns_abri_on_and_loads_strictly():
    torch.manual_seed(0)
    source = abri.apply(randomised(torchvision.models.resnet18()), granularity="channel")
    source.fc = nn.Identity()
    with torch.no_grad():
        for _, layer in abri.abri_layers(source):
            layer.abri_alpha.uniform_(0, 1)
            layer.abri_weight.normal_()
    own = source.state_dict()
    official = {name: own[key] for name, key in abri.official_key_map(source).items()}
    assert any("downsample.bn_addition" in key for key in official)
    encoder = load_encoder(ResNetEncoder("resnet18", 3, fuse_relu=False), official)
    assert len(list(abri.abri_layers(encoder))) == 20
    x = torch.randn(2, 3, 32, 32)
    source.eval(), encoder.eval()
    torch.testing.assert_close(encoder(x), torchvision_trunk(source)(x), rtol=1e-5, atol=1e-5)


def test_avkernels_abri_checkpoint_round_trip():
    source = abri.apply(ResNetEncoder("resnet18", 1, width=4))
    encoder = load_encoder(ResNetEncoder("resnet18", 1, width=4), source.state_dict())
    assert len(list(abri.abri_layers(encoder))) == 20
    for key, value in source.state_dict().items():
        assert torch.equal(value, encoder.state_dict()[key]), key


def test_plain_checkpoint_into_an_abri_encoder_keeps_the_added_bn_fresh():
    reference = randomised(torchvision.models.resnet18())
    encoder = load_encoder(abri.apply(ResNetEncoder("resnet18", 3)), reference.state_dict())
    assert torch.equal(encoder.layer2[0].bn1.weight, reference.layer2[0].bn1.weight)
    assert torch.equal(encoder.layer2[0].bn1.abri_weight, torch.ones(128))
    assert torch.equal(encoder.layer2[0].bn1.abri_alpha, torch.full((1,), 0.5))


def test_prefix_takes_one_encoder_of_a_whole_model(tmp_path):
    """A classifier's checkpoint (wrapped, saved from DDP): each encoder is loaded from its own
    prefix, through the library's one reader."""
    source = AVClassifier(3, width=4)
    state = {"module." + key: value for key, value in source.state_dict().items()}
    torch.save({"model": state}, tmp_path / "classifier.pt")
    for modality in ("audio", "visual"):
        encoder = getattr(AVClassifier(3, width=4), f"{modality}_net")
        load_encoder(encoder, tmp_path / "classifier.pt", prefix=f"{modality}_net.")
        for key, value in getattr(source, f"{modality}_net").state_dict().items():
            assert torch.equal(encoder.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="no key of the checkpoint starts with"):
        load_encoder(ResNetEncoder("resnet18", 1, width=4), state, prefix="text_net.")


def test_classifier_keys_follow_the_official_layout():
    keys = set(AVClassifier(5, width=4).state_dict())
    assert {
        "fusion_module.fc_out.weight",
        "fusion_module.fc_out.bias",
        "audio_fc.weight",
        "visual_fc.weight",
        "audio_net.conv1.weight",
        "visual_net.layer4.1.bn2.bias",
    } <= keys


def test_visual_features_pool_over_frames_and_space():
    torch.manual_seed(0)
    model = AVClassifier(4, width=4).eval()
    visual = torch.randn(2, 3, 3, 32, 32)  # (B, C, T, H, W)
    per_frame = torch.stack(
        [model.visual_net(visual[:, :, t]).mean(dim=(2, 3)) for t in range(3)], dim=1
    )
    torch.testing.assert_close(model.encode_visual(visual), per_frame.mean(1), rtol=1e-5, atol=1e-6)
    output = model(torch.randn(2, 1, 64, 32), visual)
    assert output.logits.shape == (2, 4)
    torch.testing.assert_close(output.logits, output.logits_a + output.logits_v)
    assert model.forward_audio(torch.randn(2, 1, 64, 32)).shape == (2, 4)


def test_frames_first_layout_is_caught_when_the_shape_tells():
    model = AVClassifier(4, width=4)
    frames_first = torch.randn(2, 4, 3, 32, 32)  # (B, T=4, C=3, H, W)
    with pytest.raises(ValueError, match=r"looks like \(B, T, C, H, W\).*permute\(0, 2, 1, 3, 4\)"):
        model.encode_visual(frames_first)
    with pytest.raises(ValueError, match=r"audio must be \(B, 1, frames, mel\)"):
        model.encode_audio(torch.randn(2, 64, 32))
    with pytest.raises(ValueError, match="2 audio and 3 visual"):
        model(torch.randn(2, 1, 64, 32), torch.randn(3, 3, 2, 32, 32))
