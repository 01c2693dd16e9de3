"""The PyTorch kit: PyTorch's standard training loop and a state_dict checkpoint."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from kits import reference_model


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


class TorchKit:
    id = "torch"
    bn_names = {"gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}
    dense_kernel = "weight"
    running_var_unbiased = True  # torch updates running_var with n/(n-1) x the batch variance

    def model(self, seed: int = 0, dropout: float = 0.5):
        return reference_model("torch", seed, dropout)

    def fit(self, model, x, y, epochs=2, batch_size=8, lr=1e-2, optimizer="adamw"):
        # The PyTorch tutorial loop: an optimizer over model.parameters(), train() each epoch.
        opt = {
            "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
            "adam": lambda p: torch.optim.Adam(p, lr=lr, eps=1e-12),
            "sgd": lambda p: torch.optim.SGD(p, lr=lr),
        }[optimizer](model.parameters())
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
        fresh = self.model(seed=1)
        fresh.load_state_dict(torch.load(path))
        return fresh


KIT = TorchKit()
