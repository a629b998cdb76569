"""Observers: statistics per granularity, the streaming percentile vs torch.quantile, state_dict round trip, errors.

Tolerances: min-max and EMA are exact (EMA up to fp32 rounding of its recurrence, rtol 1e-6); the percentile is within
one histogram bin width (hist_max / bins) of torch.quantile over all batches concatenated.
"""

import pytest
import torch

from qmamba.quant import (EMAObserver, MinMaxObserver, PerChannel, PercentileObserver, PerGroup, PerTensor,
                          make_observer, scale_from_absmax)

KINDS = ["minmax", "ema", "percentile"]


def test_minmax_per_tensor():
    obs = MinMaxObserver(name="a")
    x1, x2 = torch.tensor([[1.0, -2.0], [0.5, 1.5]]), torch.tensor([[-0.5, 3.0]])
    assert obs(x1) is x1
    obs(x2)
    assert obs.absmax().item() == 3.0
    assert (obs.min_val.item(), obs.max_val.item()) == (-2.0, 3.0)
    assert int(obs.num_batches) == 2
    assert torch.equal(obs.scale(), torch.tensor(3.0) / 127)
    assert torch.equal(obs.scale(bits=4), torch.tensor(3.0) / 7)


def test_minmax_per_channel_and_per_group():
    xs = [torch.randn(4, 3, 8) * (i + 1) for i in range(3)]
    cat = torch.cat(xs)
    ch = MinMaxObserver(PerChannel(axis=1), channels=3)
    grp = MinMaxObserver(PerGroup(4, axis=-1), channels=8)
    for x in xs:
        ch(x)
        grp(x)
    assert ch.absmax().shape == (3,)
    assert torch.equal(ch.absmax(), cat.abs().amax(dim=(0, 2)))
    assert torch.equal(ch.min_val, cat.amin(dim=(0, 2)))
    assert torch.equal(ch.max_val, cat.amax(dim=(0, 2)))
    assert torch.equal(grp.absmax(), torch.stack([cat[..., :4].abs().max(), cat[..., 4:].abs().max()]))
    with pytest.raises(ValueError, match="built for 8 channels"):
        grp(torch.randn(2, 3, 4))


def test_ema_values():
    obs = EMAObserver(PerChannel(), channels=2, momentum=0.9)
    batches = [torch.tensor([[1.0, -4.0]]), torch.tensor([[-3.0, 2.0]]), torch.tensor([[2.0, 1.0], [0.5, -6.0]])]
    want = None
    for b in batches:
        obs(b)
        m = b.abs().amax(0)
        want = m if want is None else 0.9 * want + 0.1 * m
    torch.testing.assert_close(obs.absmax(), want, rtol=1e-6, atol=0)
    assert obs.absmax().tolist() != batches[-1].abs().amax(0).tolist()  # really averaged


def _quantile_within_a_bin(obs, data, alpha):
    want = torch.quantile(data.abs().double(), alpha).float()
    width = obs.hist_max / obs.bins
    got = obs.absmax()
    assert bool(((got - want).abs() <= width).all()), (got, want, width)


@pytest.mark.parametrize("alpha", [0.99, 0.999, 0.5])
def test_percentile_matches_quantile_of_all_batches(alpha):
    obs = PercentileObserver(alpha=alpha, bins=512)
    ranges = [0.3, 1.0, 7.0, 2.0, 40.0, 0.1]  # growing and shrinking: the histogram re-bins several times
    xs = [torch.randn(3000) * r for r in ranges]
    maxima = []
    for x in xs:
        obs(x)
        maxima.append(float(obs.hist_max))
    assert len(set(maxima)) >= 3  # re-binning was exercised
    _quantile_within_a_bin(obs, torch.cat(xs), alpha)
    assert obs.hist.sum().item() == sum(x.numel() for x in xs)


def test_percentile_is_order_independent_up_to_bins():
    xs = [torch.randn(2000) * r for r in (0.5, 9.0, 2.0)]
    a, b = PercentileObserver(alpha=0.999, bins=256), PercentileObserver(alpha=0.999, bins=256)
    for x in xs:
        a(x)
    for x in reversed(xs):
        b(x)
    # power-of-two ranges: the same bin edges whatever the order, so identical histograms
    assert torch.equal(a.hist, b.hist) and torch.equal(a.absmax(), b.absmax())


def test_percentile_alpha_one_is_the_max():
    obs = PercentileObserver(alpha=1.0)
    xs = [torch.randn(1000) * r for r in (1.0, 5.0, 0.2)]
    for x in xs:
        obs(x)
    assert obs.absmax().item() == torch.cat(xs).abs().max().item()


def test_percentile_per_channel_and_per_group():
    xs = [torch.randn(200, 6) * torch.tensor([0.1, 1, 10, 2, 3, 50]) * (i + 1) for i in range(3)]
    cat = torch.cat(xs)
    ch = PercentileObserver(PerChannel(), channels=6, alpha=0.99, bins=256)
    grp = PercentileObserver(PerGroup(3), channels=6, alpha=0.99, bins=256)
    for x in xs:
        ch(x)
        grp(x)
    want_ch = torch.quantile(cat.abs().T.double(), 0.99, dim=1).float()
    assert bool(((ch.absmax() - want_ch).abs() <= ch.hist_max / 256).all())
    want_g = torch.stack([torch.quantile(cat[:, 3 * g:3 * g + 3].abs().reshape(-1).double(), 0.99)
                          for g in range(2)]).float()
    assert bool(((grp.absmax() - want_g).abs() <= grp.hist_max / 256).all())


def test_percentile_all_zeros_then_data():
    obs = PercentileObserver(alpha=0.5, bins=64)
    obs(torch.zeros(100))
    assert obs.absmax().item() == 0.0 and obs.scale().item() > 0
    obs(torch.full((300,), 3.0))
    assert obs.hist.sum().item() == 400 and obs.hist[0].item() == 100
    assert 2.9 < obs.absmax().item() <= 3.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gran,channels", [(PerTensor(), 1), (PerChannel(1), 4), (PerGroup(2, 1), 4)])
def test_state_dict_round_trip(kind, gran, channels):
    obs = make_observer(kind, gran, channels, name="m.x")
    for i in range(3):
        obs(torch.randn(2, 4, 5) * (i + 1))
    sd = obs.state_dict()
    assert "num_batches" in sd and len(sd) >= 2
    fresh = make_observer(kind, gran, channels, name="m.x")  # buffers exist before any data: loadable on resume
    with pytest.raises(RuntimeError, match="saw no data"):
        fresh.scale()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.scale(), obs.scale())
    assert fresh.scale().shape == gran.stat_shape(channels)
    # keeps observing where it left off
    x = torch.randn(2, 4, 5) * 5
    obs(x)
    fresh(x)
    assert torch.equal(fresh.scale(), obs.scale())


@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf_name_the_observer(kind):
    obs = make_observer(kind, name="backbone.layers.3.mixer.x_proj.input")
    obs(torch.randn(8))
    x = torch.randn(8)
    x[2] = float("nan")
    with pytest.raises(ValueError, match=r"'backbone\.layers\.3\.mixer\.x_proj\.input'.*NaN.*batch 2"):
        obs(x)
    x[2] = float("-inf")
    with pytest.raises(ValueError, match=r"x_proj\.input.*inf.*batch 2"):
        obs(x)
    assert int(obs.num_batches) == 1  # the bad batches changed nothing


@pytest.mark.parametrize("kind", KINDS)
def test_scale_before_data_is_a_clear_error(kind):
    obs = make_observer(kind, name="layers.0.in_proj.input")
    with pytest.raises(RuntimeError, match=r"'layers\.0\.in_proj\.input' saw no data.*calibration"):
        obs.scale()
    obs(torch.empty(0, 4))  # an empty batch is not data
    with pytest.raises(RuntimeError, match="saw no data"):
        obs.absmax()


@pytest.mark.parametrize("kind", KINDS)
def test_reset_and_sync_without_distributed(kind):
    obs = make_observer(kind)
    obs(torch.randn(10) * 3)
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    obs.sync_()  # single process: no-op
    assert all(torch.equal(before[k], v) for k, v in obs.state_dict().items())
    obs.reset_()
    assert int(obs.num_batches) == 0
    obs(torch.tensor([0.5, -1.0]))
    assert obs.absmax().item() == pytest.approx(1.0, abs=1e-6 if kind != "percentile" else 1.0 / 2048 * 2)


def test_buffers_keep_their_dtype_under_module_casts():
    obs = PercentileObserver(PerChannel(), channels=3)
    obs(torch.randn(5, 3))
    ref = obs.scale()
    obs.to(torch.bfloat16)
    obs.half()
    assert obs.hist.dtype == torch.float64 and obs.max_abs.dtype == torch.float32
    assert torch.equal(obs.scale(), ref)
    obs(torch.randn(5, 3, dtype=torch.bfloat16))  # a bf16 model feeds it bf16 activations
    assert obs.hist.sum().item() == 30


def test_make_observer():
    assert isinstance(make_observer("percentile", alpha=0.9, bins=16), PercentileObserver)
    obs = make_observer("ema", {"type": "per_group", "group_size": 2}, 4, name="n", momentum=0.5)
    assert isinstance(obs, EMAObserver) and obs.granularity == PerGroup(2) and obs.momentum == 0.5
    with pytest.raises(ValueError, match=r"'histogram'.*\['ema', 'minmax', 'percentile'\]"):
        make_observer("histogram")
    with pytest.raises(ValueError, match="alpha"):
        make_observer("percentile", alpha=0.0)


def test_scale_is_scale_from_absmax():
    obs = PercentileObserver(alpha=0.999)
    obs(torch.randn(4000))
    assert torch.equal(obs.scale(bits=6), scale_from_absmax(obs.absmax(), bits=6))
