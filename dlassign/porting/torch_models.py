"""PyTorch modules that torchvision lacks, mirroring our Flax ones (needs the torch extra)."""

from __future__ import annotations


def lenet5(num_classes: int = 10, in_channels: int = 3):
    """The PyTorch LeNet-5 that `dlassign.models.LeNet5` mirrors: ReLU and 2x2 max pooling."""
    import torch
    from torch import nn

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, 6, 5)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, num_classes)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = torch.flatten(x, 1)
            x = torch.relu(self.fc1(x))
            x = torch.relu(self.fc2(x))
            return self.fc3(x)

    return LeNet5()


def build(arch: str, num_classes: int = 10):
    """A randomly initialised torch model of `arch` (torchvision's, or LeNet-5 above)."""
    if arch == "lenet5":
        return lenet5(num_classes)
    import torchvision

    from dlassign.porting.io import TORCHVISION_NAMES

    return torchvision.models.get_model(TORCHVISION_NAMES[arch], weights=None,
                                        num_classes=num_classes)
