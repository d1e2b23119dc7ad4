"""Toy networks shared by the engine tests (one definition each), and the helper that flattens their gradients."""
import torch
from torch import nn

from gmd_ext.ops.ds_ops import declare_modality


class Heads(nn.Module):
    """A shared trunk and `k` heads whose objectives conflict (head k's target is (-1)^k y, plus a tilt): every
    parameter is reached by some objective. losses(x [B, 6], y [B, 2]) -> k scalar losses."""

    def __init__(self, k: int = 3, hidden: int = 16, width: int = 8):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, width))
        self.heads = nn.ModuleList(nn.Linear(width, 2) for _ in range(k))

    def losses(self, x, y):
        z = torch.tanh(self.trunk(x))
        return [((h(z) - (-1) ** j * y) ** 2).mean() + 0.1 * j * h(z).mean() for j, h in enumerate(self.heads)]


class LateFusionNet(nn.Module):
    """A user's late-fusion model: one declared encoder per modality, a shared head, branches as a tuple; an
    absent branch is never computed (a zero output without a graph). forward_branches(x [B, 3, 5], present
    bool [B, 3]) -> 3 tensors [B, 1]."""
    modalities = ("a", "b", "c")

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList(nn.Linear(5, 4) for _ in self.modalities)
        self.head = nn.Linear(4, 1)
        for m, enc in enumerate(self.enc):
            for p in enc.parameters():
                declare_modality(p, m)

    def forward_branches(self, x, present):
        out = []
        for m, enc in enumerate(self.enc):
            rows = present[:, m]
            if not bool(rows.any()):
                out.append(torch.zeros(x.shape[0], 1))
                continue
            out.append(torch.where(rows[:, None], self.head(torch.relu(enc(x[:, m]))), 0.0))
        return tuple(out)


def flat_grads(params) -> torch.Tensor:
    """The parameters' .grad flattened into one vector (zeros where .grad is None); full tensors of DTensors."""
    def full(g):
        return g.full_tensor() if hasattr(g, "full_tensor") else g
    return torch.cat([(torch.zeros_like(full(p.detach())) if p.grad is None else full(p.grad)).flatten()
                      for p in params])
