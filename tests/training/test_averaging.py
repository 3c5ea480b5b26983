"""The exponential moving average of the weights (advcli/averaging.py) against a direct computation."""

from __future__ import annotations

import pytest
import torch

from advcli.training.averaging import ema_decay, ema_model


def test_ema_weights_equal_a_direct_computation_after_a_few_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    average = ema_model(model, decay=0.8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = None
    for _ in range(6):
        loss = model(torch.randn(8, 4)).square().mean()  # BatchNorm's running statistics move too
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        average.update_parameters(model)
        now = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if expected is None:  # the first update copies the weights
            expected, updates = now, 1
            continue
        decay = min(0.8, (1 + updates) / (10 + updates))
        expected = {k: v if not v.is_floating_point() else decay * expected[k] + (1 - decay) * v for k, v in now.items()}
        updates += 1
    assert updates == 6 and int(average.n_averaged) == 6
    for name, value in average.module.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert not torch.allclose(average.module[0].weight, model[0].weight)


def test_the_decay_warms_up_then_holds():
    assert ema_decay(0.999, 0) == pytest.approx(0.1) and ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.999, 100_000) == 0.999


def test_a_decay_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="decay"):
        ema_model(torch.nn.Linear(2, 2), decay=1.0)
