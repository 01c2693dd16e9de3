"""The PyTorch kit: the standard test model and PyTorch's standard training loop."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from kits import IMAGE_SHAPE, NUM_CLASSES


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.1)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class GlobalAvgPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


class Base(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.block1 = Block(IMAGE_SHAPE[2], 8)
        self.block2 = Block(8, 8)
        self.drop = nn.Dropout(dropout)
        self.pool = GlobalAvgPool()

    def forward(self, x):
        return self.pool(self.drop(self.block2(self.block1(x))))


class Head(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.dense(self.drop(x))


class Net(nn.Module):
    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.base = Base(dropout)
        self.head = Head(dropout)

    def forward(self, x):
        return self.head(self.base(x))


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


class TorchKit:
    id = "torch"
    bn_names = {"gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}
    dense_kernel = "weight"

    def model(self, seed: int = 0, dropout: float = 0.5) -> Net:
        torch.manual_seed(seed)
        return Net(dropout)

    def fit(self, model, x, y, epochs=2, batch_size=8, lr=1e-2):
        # The PyTorch tutorial loop: an optimizer over model.parameters(), train() each epoch.
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        loss_fn = nn.CrossEntropyLoss()
        xt, yt = _nchw(x), torch.from_numpy(y)
        losses = []
        for _ in range(epochs):
            model.train()
            for i in range(0, len(xt), batch_size):
                opt.zero_grad()
                loss = loss_fn(model(xt[i : i + batch_size]), yt[i : i + batch_size])
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses

    def predict(self, model, x):
        model.eval()
        with torch.no_grad():
            return model(_nchw(x)).numpy()

    def forward_train(self, model, x):
        model.train()
        with torch.no_grad():
            return model(_nchw(x)).numpy()

    def save_load(self, model, directory):
        path = os.path.join(directory, "model.pt")
        torch.save(model.state_dict(), path)
        fresh = Net()
        fresh.load_state_dict(torch.load(path))
        return fresh


KIT = TorchKit()
