"""Granularity types: stat shapes, reductions over every dim but the channel axis, broadcast back, dict round trip."""

import pytest
import torch

from qmamba.quant import PerChannel, PerGroup, PerTensor, granularity_from_dict


def test_stat_shapes():
    assert PerTensor().stat_shape(7) == ()
    assert PerChannel().stat_shape(7) == (7,)
    assert PerGroup(4).stat_shape(12) == (3,)
    with pytest.raises(ValueError, match=r"group_size=5.*12"):
        PerGroup(5).stat_shape(12)
    with pytest.raises(ValueError, match="positive"):
        PerGroup(0)


def test_absmax_and_min_max_per_tensor():
    x = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    assert PerTensor().absmax(x).shape == ()
    assert PerTensor().absmax(x).item() == 3.0
    lo, hi = PerTensor().min_max(x)
    assert (lo.item(), hi.item()) == (-3.0, 2.0)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_per_channel_reduces_every_other_dim(axis):
    x = torch.randn(3, 5, 4)
    got = PerChannel(axis).absmax(x)
    a = axis % 3
    want = torch.stack([x.select(a, c).abs().max() for c in range(x.shape[a])])
    assert torch.equal(got, want)
    lo, hi = PerChannel(axis).min_max(x)
    assert torch.equal(lo, torch.stack([x.select(a, c).min() for c in range(x.shape[a])]))
    assert torch.equal(hi, torch.stack([x.select(a, c).max() for c in range(x.shape[a])]))


@pytest.mark.parametrize("axis", [-1, 1])
def test_per_group_groups_consecutive_channels(axis):
    x = torch.randn(2, 12, 3) if axis == 1 else torch.randn(2, 3, 12)
    g = PerGroup(4, axis=axis)
    got = g.absmax(x)
    want = torch.stack([x.narrow(axis, 4 * i, 4).abs().max() for i in range(3)])
    assert got.shape == (3,) and torch.equal(got, want)
    lo, hi = g.min_max(x)
    assert torch.equal(lo, torch.stack([x.narrow(axis, 4 * i, 4).min() for i in range(3)]))
    assert torch.equal(hi, torch.stack([x.narrow(axis, 4 * i, 4).max() for i in range(3)]))


def test_per_group_wrong_channels_error_names_both():
    with pytest.raises(ValueError, match=r"group_size=4.*10"):
        PerGroup(4).absmax(torch.randn(3, 10))


def test_broadcast_places_stat_at_axis():
    x = torch.randn(2, 6, 5)
    b = PerChannel(axis=1).broadcast(torch.arange(6.0), 3)
    assert b.shape == (1, 6, 1)
    assert torch.equal((x * 0 + b)[1, :, 3], torch.arange(6.0))
    b = PerGroup(2, axis=1).broadcast(torch.tensor([10.0, 20.0, 30.0]), 3)
    assert b.shape == (1, 6, 1)
    assert b.reshape(-1).tolist() == [10.0, 10.0, 20.0, 20.0, 30.0, 30.0]
    b = PerGroup(3, axis=-1).broadcast(torch.tensor([1.0, 2.0]), 2)
    assert b.shape == (1, 6) and b.reshape(-1).tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert PerTensor().broadcast(torch.tensor(2.0), 3).shape == (1, 1, 1)


def test_absmax_broadcast_bounds_every_element():
    # The stat of each element's own group, broadcast back, is >= |element|, with equality somewhere in each group.
    x = torch.randn(4, 3, 8)
    for g in (PerTensor(), PerChannel(1), PerChannel(-1), PerGroup(2, -1), PerGroup(4, -1)):
        b = g.broadcast(g.absmax(x), x.ndim)
        assert bool((x.abs() <= b).all()), g
        assert bool((g.min_max(x.abs() - b)[1] == 0).all()), g


@pytest.mark.parametrize("g", [PerTensor(), PerChannel(), PerChannel(axis=0), PerGroup(64), PerGroup(8, axis=1)])
def test_dict_round_trip(g):
    d = g.to_dict()
    assert granularity_from_dict(d) == g
    assert d["type"] in ("per_tensor", "per_channel", "per_group")


def test_from_dict_forms_and_errors():
    assert granularity_from_dict({"type": "per_group", "group_size": 64, "axis": -1}) == PerGroup(64, -1)
    assert granularity_from_dict("per_channel") == PerChannel(-1)
    assert granularity_from_dict(PerGroup(2)) == PerGroup(2)
    with pytest.raises(ValueError, match="per_tensor"):
        granularity_from_dict({"type": "per_row"})
    with pytest.raises(ValueError, match="bad fields"):
        granularity_from_dict({"type": "per_channel", "group_size": 3})
    with pytest.raises(ValueError, match="positive"):
        granularity_from_dict({"type": "per_group", "group_size": -2})
