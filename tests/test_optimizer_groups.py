"""The training loop's Adam joins parameter groups of equal settings: the same updates, fewer ops per step, and
checkpoints written with one group per stage group still load."""
import copy

import torch

from fastdream.config import OptimConfig
from fastdream.train import merge_param_groups, merged_optimizer_state


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, generator=g)) for _ in range(4)]


def _groups(p, lr_background=1e-3):
    return [{"params": [p[0]], "lr": 1e-2, "name": "hash"}, {"params": [p[1], p[2]], "lr": 1e-3, "name": "mlp"},
            {"params": [p[3]], "lr": lr_background, "name": "background"}]


def _train(optimizer, params, steps=3):
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.sin(p.detach() * (i + 1) + step)
        optimizer.step()


def test_groups_with_equal_settings_are_joined_in_order():
    p = _params()
    merged = merge_param_groups(_groups(p))
    assert [g["name"] for g in merged] == ["hash", "mlp+background"]
    assert [len(g["params"]) for g in merged] == [1, 3] and merged[1]["params"][2] is p[3]
    assert len(merge_param_groups(_groups(p, lr_background=5e-3))) == 3  # another rate: its own group
    assert OptimConfig().lr_mlp == OptimConfig().lr_background  # so the default run steps two groups, not three


def test_joined_groups_train_exactly_as_separate_ones_and_load_their_checkpoints():
    a, b = _params(), _params()
    separate = torch.optim.Adam(_groups(a), betas=(0.9, 0.99), eps=1e-15, fused=True)
    joined = torch.optim.Adam(merge_param_groups(_groups(b)), betas=(0.9, 0.99), eps=1e-15, fused=True)
    _train(separate, a)
    _train(joined, b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # a checkpoint of the separate groups resumes into the joined ones, moments and step counts included
    resumed = torch.optim.Adam(merge_param_groups(_groups(b)), betas=(0.9, 0.99), eps=1e-15, fused=True)
    resumed.load_state_dict(merged_optimizer_state(copy.deepcopy(separate.state_dict())))  # as from a file
    _train(separate, a, steps=2)
    _train(resumed, b, steps=2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
