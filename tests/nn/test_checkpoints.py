"""``avkernels.checkpoints``, the one checkpoint reader of the library and the application:
files unwrapped and stripped of a DDP prefix, and strict loading of every recognised layout."""

from __future__ import annotations

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from avkernels import abri  # noqa: E402
from avkernels.checkpoints import CheckpointError, load_resnet, load_state_dict  # noqa: E402
from tests.helpers.official import OfficialResNet18, randomise  # noqa: E402


def test_load_state_dict_unwraps_and_strips_ddp_prefix(tmp_path):
    weights = {"module.conv1.weight": torch.ones(1)}
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "ddp.pt")
    assert list(load_state_dict(tmp_path / "ddp.pt")) == ["conv1.weight"]
    assert list(load_state_dict(str(tmp_path / "ddp.pt"))) == ["conv1.weight"]
    assert load_state_dict(weights) == weights  # a mapping is the state dict itself
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_state_dict(tmp_path / "list.pt")


@pytest.mark.parametrize("layout", ["torchvision", "avkernels ABRi", "official ABRi"])
def test_load_resnet_recognises_the_layout_and_loads_strictly(layout):
    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    if layout == "avkernels ABRi":
        source = abri.apply(source, granularity="channel")
    if layout == "official ABRi":
        official = randomise(OfficialResNet18("channel", in_channels=3), 3)
        state_dict = official.state_dict()
    else:
        state_dict = source.state_dict()
    model = torchvision.models.resnet18()
    if layout == "official ABRi":
        model.fc = torch.nn.Identity()  # the official backbone has no classifier
    found = load_resnet(model, state_dict, "resnet18")
    assert found == (None if layout == "torchvision" else layout)
    assert (len(list(abri.abri_layers(model))) == 20) == (layout != "torchvision")
    if layout != "official ABRi":
        for key, value in state_dict.items():
            assert torch.equal(model.state_dict()[key], value), key


def test_load_resnet_names_the_keys_at_fault():
    state_dict = torchvision.models.resnet34().state_dict()
    with pytest.raises(CheckpointError, match=r"^encoder: the checkpoint does not match.*resnet34"):
        load_resnet(torchvision.models.resnet18(), state_dict, "resnet18", caller="encoder")
