"""Edge cases of the transforms: re-preparing with another recipe, recalibrating, a failed calibration, an
inconsistent int8 checkpoint."""

import pytest
import torch

from qmamba import MambaLM, preset
from qmamba.lightning.checkpoint import checkpoint_entry, load_checkpoint_model
from qmamba.qnn import calibrate, convert, current_mode, prepare, quant_points, set_mode


def calibrated_tiny(batches):
    torch.manual_seed(0)  # the same weights every call
    model = prepare(MambaLM(preset("tiny")), "quamba_w8a8")
    calibrate(model, batches, progress=False)
    return model


def test_prepare_again_with_another_recipe_is_refused():
    model = prepare(MambaLM(preset("tiny")), "quamba_w8a8")
    assert prepare(model, "quamba_w8a8") is model  # the same recipe: a no-op
    with pytest.raises(ValueError, match="already prepared with recipe 'quamba_w8a8'"):
        prepare(model, "qat_w8a8")


def test_recalibration_starts_from_nothing():
    big = [torch.randint(0, 256, (2, 32)) for _ in range(2)]
    model = calibrated_tiny(big)
    small = [torch.zeros(2, 32, dtype=torch.long)]
    calibrate(model, small, progress=False)
    fresh = calibrated_tiny(small)
    for a, b in zip(quant_points(model), quant_points(fresh)):
        torch.testing.assert_close(a.scale, b.scale, rtol=0, atol=0, msg=a.name)


def test_failed_calibration_restores_mode_and_training_flag():
    model = calibrated_tiny([torch.randint(0, 256, (2, 32))])
    set_mode(model, "fakequant")
    model.train()
    with torch.no_grad():
        model.backbone.embedding.weight[3] = float("nan")
    with pytest.raises(ValueError, match="backbone.layers.0.mixer"):
        calibrate(model, [torch.full((2, 32), 3)], progress=False)
    assert current_mode(model) == "fakequant" and model.training
    assert not any(p.observing for p in quant_points(model))


def test_int8_checkpoint_with_float_weights_is_refused(tmp_path):
    model = calibrated_tiny([torch.randint(0, 256, (2, 32))])
    entry_float = checkpoint_entry(model)  # prepared, not converted
    state_float = {f"model.{k}": v for k, v in model.state_dict().items()}
    convert(model)
    bad = {"state_dict": state_float, "qmamba": {**entry_float, "int8": True}}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="says int8 but holds"):
        load_checkpoint_model(tmp_path / "bad.ckpt")


def test_readiness_is_read_on_the_host_once_per_change(monkeypatch):
    """QuantPoint.is_ready caches the ready buffer's value by the tensor's identity and version: a forward reads no
    ready flag on the host (each read is a device sync on a GPU), and every way the flag changes is still seen."""
    import copy

    import torch

    from qmamba import MambaLM, preset
    from qmamba.qnn import calibrate, prepare, quant_points, set_mode

    torch.manual_seed(0)
    fresh = prepare(MambaLM(preset("tiny")), "qat_w8a8")
    model = copy.deepcopy(fresh)
    points = list(quant_points(model))
    acts = [p for p in points if not p.is_weight]
    assert acts and not any(p.is_ready() for p in acts)
    ids = torch.randint(0, 256, (2, 16))
    calibrate(model, [ids], progress=False)  # freeze_ fills ready in place: a new version
    assert all(p.is_ready() for p in acts)

    set_mode(model, "fakequant")
    model(ids)  # the weight points' flags (never asked before) are read once here
    readys = {id(p.ready) for p in points}
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__",
                        lambda t: (reads.append(1) if id(t) in readys else None, real_bool(t))[1])
    model(ids)
    model(ids).sum().backward()
    assert reads == []  # no host read of a ready flag in later forwards
    monkeypatch.undo()

    model.load_state_dict(fresh.state_dict())  # copy_ of an uncalibrated state: seen, the forward refuses
    assert not any(p.is_ready() for p in acts)
    with pytest.raises(RuntimeError, match="has no scale yet"):
        model(ids)
    acts[0]._buffers["ready"] = torch.ones((), dtype=torch.bool)  # a replaced tensor (what .to() does): seen
    assert acts[0].is_ready()
