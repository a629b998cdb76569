"""Observers under DDP: two CPU processes (gloo) feed different data, sync_(), and must end with identical buffers;
min-max equals the global max, percentile the quantile of the union (within one bin width), EMA the mean of the
ranks' EMAs (a rank with no data does not count).
"""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qmamba.quant import PerChannel, make_observer

WORLD = 2


def _rank_data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    scale = torch.tensor([0.5, 2.0, 8.0]) * (1 + 3 * rank)  # rank 1's range is 4x rank 0's: percentile re-bins
    return [torch.randn(400, 3, generator=g) * scale * (b + 1) for b in range(3)]


def _observers():
    return {
        "minmax_ch": make_observer("minmax", PerChannel(), 3, name="minmax_ch"),
        "ema": make_observer("ema", name="ema", momentum=0.8),
        "ema_rank0_only": make_observer("ema", name="ema_rank0_only", momentum=0.8),
        "percentile": make_observer("percentile", name="percentile", alpha=0.99, bins=1024),
        "percentile_ch": make_observer("percentile", PerChannel(), 3, name="percentile_ch", alpha=0.99, bins=256),
    }


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        obs = _observers()
        for x in _rank_data(rank):
            for name, o in obs.items():
                if name != "ema_rank0_only" or rank == 0:
                    o(x)
        local = {name: o.absmax() for name, o in obs.items() if int(o.num_batches) > 0}
        for o in obs.values():
            o.sync_()
        synced = {name: {k: v.clone() for k, v in o.state_dict().items()} for name, o in obs.items()}
        scales = {name: o.scale() for name, o in obs.items()}
        for o in obs.values():  # idempotent: a second sync changes nothing
            o.sync_()
        again = {name: {k: v.clone() for k, v in o.state_dict().items()} for name, o in obs.items()}
        torch.save({"local": local, "synced": synced, "scales": scales, "again": again}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_observers_sync_across_two_gloo_ranks(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for name in _observers():
        for k, v in res[0]["synced"][name].items():
            assert torch.equal(v, res[1]["synced"][name][k]), f"{name}.{k} differs across ranks"
            assert torch.equal(v, res[0]["again"][name][k]), f"{name}.{k} changed on a second sync_()"
        assert torch.equal(res[0]["scales"][name], res[1]["scales"][name])

    data = [torch.cat(_rank_data(r)) for r in range(WORLD)]
    union = torch.cat(data)
    mm = res[0]["synced"]["minmax_ch"]
    assert torch.equal(mm["max_abs"], union.abs().amax(0))
    assert torch.equal(mm["min_val"], union.amin(0)) and torch.equal(mm["max_val"], union.amax(0))
    assert int(mm["num_batches"]) == 3

    # the two ranks really differed before the sync
    assert not torch.equal(res[0]["local"]["minmax_ch"], res[1]["local"]["minmax_ch"])

    ema = res[0]["synced"]["ema"]["ema"]
    torch.testing.assert_close(ema, (res[0]["local"]["ema"] + res[1]["local"]["ema"]) / 2)
    assert torch.equal(res[0]["synced"]["ema_rank0_only"]["ema"], res[0]["local"]["ema_rank0_only"])
    assert int(res[1]["synced"]["ema_rank0_only"]["num_batches"]) == 3

    p = res[0]["synced"]["percentile"]
    want = torch.quantile(union.abs().reshape(-1).double(), 0.99).float()
    got = res[0]["scales"]["percentile"] * 127
    assert abs(float(got) - float(want)) <= float(p["hist_max"]) / 1024 + 1e-6
    assert res[0]["local"]["percentile"] != res[1]["local"]["percentile"]

    pc = res[0]["synced"]["percentile_ch"]
    want_c = torch.quantile(union.abs().T.double(), 0.99, dim=1).float()
    got_c = res[0]["scales"]["percentile_ch"] * 127
    assert bool(((got_c - want_c).abs() <= pc["hist_max"] / 256 + 1e-6).all())
