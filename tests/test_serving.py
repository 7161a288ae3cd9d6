"""passray.serving.Served: the served copy computes what the network computes, faster paths aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from passray.config import ModelConfig, PromptConfig
from passray.models import create_backbone
from passray.network import PrunableNet
from passray.prompts import create_prompt
from passray.serving import Served


def _trained_net(arch: str) -> PrunableNet:
    torch.manual_seed(0)
    net = PrunableNet(create_backbone(ModelConfig(arch=arch), 10), create_prompt(PromptConfig(kind="pad", size=4), 32))
    net.train()
    with torch.no_grad():
        for _ in range(3):  # BN running statistics away from their initial values, so folding them matters
            net(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    return net.eval()


@pytest.mark.parametrize("arch", ["convnet", "resnet8"])
def test_served_copy_matches_the_network_with_batch_norm_folded(arch: str) -> None:
    net = _trained_net(arch)
    served = Served(net, batch_size=4, device="cpu", dtype="fp32")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in served.net.modules())  # folded into the convs
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the caller's network is untouched
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(served(x), net(x), rtol=1e-5, atol=1e-5)


def test_served_refuses_other_shapes_and_dtypes() -> None:
    served = Served(_trained_net("convnet"), batch_size=2, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match=r"input of shape \(3, 3, 32, 32\): this Served takes \(2, 3, 32, 32\)"):
        served(torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="dtype 'int8'"):
        Served(_trained_net("convnet"), batch_size=2, device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="compile 'fast': choose one of default, max-autotune or None"):
        Served(_trained_net("convnet"), batch_size=2, device="cpu", dtype="fp32", compile="fast")


def test_untraceable_network_is_served_unfolded(caplog: pytest.LogCaptureFixture) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # data-dependent: torch.fx cannot trace it

    net = Branchy().eval()
    served = Served(net, batch_size=1, device="cpu", dtype="fp32", input_shape=(3, 8, 8))
    assert "without folding BatchNorm" in caplog.text
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(served(x), net(x))
