"""Quantized checkpoints (prepared + calibrated, and converted int8) save and reload with their recipe and give
bit-identical logits (torch.equal) in every mode they support; the fp loader refuses them; ``evaluation.evaluate``
scores them in every mode, deterministically.

Tolerances: logits after a reload are exact; perplexities int8 vs fakequant within 1e-3 relative (the int8 GEMM and
the fakequant fp32 GEMM round differently); two evaluations of the same checkpoint are identical.
"""

import random

import pytest
import torch

import qmamba
import qmamba.lightning
from qmamba.evaluation import check_backend, data_config_of, evaluate
from qmamba.lightning.checkpoint import checkpoint_entry, load_checkpoint_model
from qmamba.models import MambaLM, load_model
from qmamba.qnn import (calibrate, convert, current_mode, is_calibrated, is_converted, is_prepared, prepare,
                        quant_points, set_mode)
from qmamba.quant.recipe import load_recipe

CASES = [("tiny", "quamba_w8a8"), ("tiny-mamba2", "quamba2_w8a8"), ("tiny", "qat_w8a8")]


def _ids(batch=2, L=24, seed=1):
    return torch.randint(0, 256, (batch, L), generator=torch.Generator().manual_seed(seed))


def _calibrated(name, recipe):
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset(name)).eval(), recipe)
    calibrate(model, [_ids(seed=s) for s in (10, 11)], progress=False)
    return model


def _save(model, path, **extra):
    ckpt = {"state_dict": {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()},
            "qmamba": checkpoint_entry(model), **extra}
    torch.save(ckpt, path)
    return path


def _logits(model, mode, x):
    set_mode(model, mode)
    with torch.no_grad():
        return model(x)


def test_checkpoint_entry_of_an_fp_model_has_no_recipe():
    model = MambaLM(qmamba.preset("tiny"))
    entry = checkpoint_entry(model)
    assert "recipe" not in entry and "int8" not in entry
    assert entry["config"] == model.config.to_dict()


@pytest.mark.parametrize("name, recipe", CASES)
def test_prepared_checkpoint_round_trip(name, recipe, tmp_path):
    model = _calibrated(name, recipe)
    entry = checkpoint_entry(model)
    assert entry["recipe"] == load_recipe(recipe).to_dict() and entry["int8"] is False
    path = _save(model, tmp_path / "prepared.ckpt")
    loaded = load_checkpoint_model(path)
    assert is_prepared(loaded) and is_calibrated(loaded) and not is_converted(loaded)
    assert loaded.quant_recipe == model.quant_recipe
    assert loaded.config == model.config
    # observer statistics and scales travel in the checkpoint
    orig_points = {p.name: p for p in quant_points(model)}
    for p in quant_points(loaded):
        o = orig_points.pop(p.name)
        assert torch.equal(p.scale, o.scale) and bool(p.ready) == bool(o.ready), p.name
        if not p.is_weight:
            assert int(p.observer.num_batches) == int(o.observer.num_batches) == 2
        assert type(p.scale) is type(o.scale)  # learnable scales stay parameters
    assert not orig_points
    x = _ids(seed=5)
    for mode in ("int8", "fakequant", "fp"):
        assert torch.equal(_logits(loaded, mode, x), _logits(model, mode, x)), mode


@pytest.mark.parametrize("name, recipe", CASES)
def test_int8_checkpoint_round_trip(name, recipe, tmp_path):
    model = _calibrated(name, recipe)
    x = _ids(seed=6)
    fq = _logits(model, "fakequant", x)
    convert(model)
    entry = checkpoint_entry(model)
    assert entry["int8"] is True and entry["recipe"]["name"] == recipe
    path = _save(model, tmp_path / "int8.ckpt")
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert saved["model.backbone.layers.0.mixer.in_proj.weight"].dtype == torch.int8
    loaded = load_checkpoint_model(path)
    assert is_converted(loaded) and current_mode(loaded) == "int8"
    assert loaded.quant_recipe == load_recipe(recipe)
    assert torch.equal(_logits(loaded, "int8", x), _logits(model, "int8", x))
    assert torch.equal(_logits(loaded, "fakequant", x), fq)
    set_mode(loaded, "fp")
    with pytest.raises(RuntimeError, match="int8"):
        with torch.no_grad():
            loaded(x)


@pytest.mark.parametrize("convert_it", [False, True])
def test_fp_loader_refuses_quantized_checkpoints(convert_it, tmp_path):
    model = _calibrated("tiny", "quamba_w8a8")
    if convert_it:
        convert(model)
    path = _save(model, tmp_path / "q.ckpt")
    with pytest.raises(ValueError) as e:
        load_model(path)
    msg = str(e.value)
    assert ("int8" if convert_it else "quantization-prepared") in msg
    assert "quamba_w8a8" in msg and "not as an fp model" in msg
    # the loader the message points to exists under the name it gives, and loads the file
    assert "qmamba.lightning.load_checkpoint_model" in msg
    assert is_prepared(qmamba.lightning.load_checkpoint_model(path))


def test_fp_checkpoint_loads_as_fp(tmp_path):
    torch.manual_seed(0)
    model = MambaLM(qmamba.preset("tiny-mamba2")).eval()
    path = _save(model, tmp_path / "fp.ckpt")
    loaded = load_checkpoint_model(path)
    assert not is_prepared(loaded)
    x = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_whose_state_does_not_fit_its_recipe(tmp_path):
    torch.manual_seed(0)
    fp = MambaLM(qmamba.preset("tiny"))
    ckpt = {"state_dict": {f"model.{k}": v for k, v in fp.state_dict().items()},
            "qmamba": {"config": fp.config.to_dict(), "recipe": load_recipe("quamba_w8a8").to_dict(), "int8": False}}
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="does not fit its recipe") as e:
        load_checkpoint_model(tmp_path / "bad.ckpt")
    assert "quant_points" in str(e.value)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not a qmamba checkpoint"):
        load_checkpoint_model(tmp_path / "foreign.ckpt")
    with pytest.raises(FileNotFoundError, match="train"):
        load_checkpoint_model(tmp_path / "missing.ckpt")


# ---- evaluation ------------------------------------------------------------------------------------------------
WORDS = ("the quantized state space model reads every byte of text and predicts the next one while a scan carries "
         "its memory forward through time rivers mountains seven bright lanterns whisper under copper skies "
         "Hamlet Ophelia integer scale rounding half even 0123456789 , . ; : ! ? ( ) - ' \"").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        rng = random.Random(i)
        lines = []
        while sum(len(line) + 1 for line in lines) < 3000 + 500 * i:
            n = rng.randint(3, 14)
            lines.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice(".!?"))
        (folder / f"work_{i}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    fp = MambaLM(qmamba.preset("tiny")).eval()
    _save(fp, folder / "fp.ckpt", datamodule_hyper_parameters={})
    model = _calibrated("tiny", "quamba_w8a8")
    _save(model, folder / "prepared.ckpt", datamodule_hyper_parameters={"seq_len": 999, "_class_path": "x"})
    convert(model)
    _save(model, folder / "int8.ckpt", datamodule_hyper_parameters={})
    return folder


def _eval(source, corpus, modes, **kw):
    return evaluate(str(source), modes=modes, data={"corpus": str(corpus), "seq_len": 32, "eval_batch_size": 8},
                    accelerator="cpu", logger=None, limit_batches=2, **kw)


def test_evaluate_all_modes_on_a_prepared_checkpoint(checkpoints, corpus):
    rows = _eval(checkpoints / "prepared.ckpt", corpus, "all")
    by_mode = {r.mode: r for r in rows}
    assert sorted(by_mode) == ["fakequant", "fp", "int8"] and len(rows) == 3
    tokens = {r.tokens for r in rows}
    assert len(tokens) == 1 and tokens.pop() == 2 * 8 * 32  # limit_batches x eval_batch_size x seq_len
    for r in rows:
        assert r.split == "test" and r.perplexity > 1 and r.bits_per_byte > 0 and r.seconds >= 0
    fp, fq, i8 = (by_mode[m].perplexity for m in ("fp", "fakequant", "int8"))
    assert fp != fq
    assert abs(i8 - fq) / fq < 1e-3
    assert abs(by_mode["int8"].bits_per_byte - by_mode["fakequant"].bits_per_byte) / by_mode["fakequant"].bits_per_byte < 1e-3
    again = _eval(checkpoints / "prepared.ckpt", corpus, "all")
    assert [(r.mode, r.tokens, r.perplexity, r.bits_per_byte) for r in again] == \
        [(r.mode, r.tokens, r.perplexity, r.bits_per_byte) for r in rows]
    # the int8 checkpoint made from it scores the same int8 perplexity, and runs int8 + fakequant only
    rows8 = {r.mode: r for r in _eval(checkpoints / "int8.ckpt", corpus, "all")}
    assert sorted(rows8) == ["fakequant", "int8"]
    assert rows8["int8"].perplexity == i8 and rows8["fakequant"].perplexity == fq


def test_evaluate_mode_errors(checkpoints, corpus):
    for mode in ("int8", "0", ["fp", "fakequant"]):
        with pytest.raises(ValueError, match="configs/ptq.yaml") as e:
            _eval(checkpoints / "fp.ckpt", corpus, mode)
        assert "an fp model" in str(e.value)
    with pytest.raises(ValueError, match="fp / prepared checkpoint"):
        _eval(checkpoints / "int8.ckpt", corpus, "fp")
    with pytest.raises(ValueError, match="unknown mode"):
        _eval(checkpoints / "prepared.ckpt", corpus, "int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_evaluate_cuda_backend_on_cpu(checkpoints, corpus):
    with pytest.raises(ValueError, match="--backend cuda cannot load here") as e:
        _eval(checkpoints / "prepared.ckpt", corpus, "int8", backend="cuda")
    assert "--backend torch" in str(e.value)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        check_backend("cuda")


def test_data_config_of_checkpoint(checkpoints):
    assert data_config_of(str(checkpoints / "prepared.ckpt")) == {"seq_len": 999}  # "_..." keys dropped
    assert data_config_of(str(checkpoints / "fp.ckpt")) == {}
    assert data_config_of("state-spaces/mamba-130m") == {}


def test_agreement_of_a_checkpoint_in_both_forcings(checkpoints, corpus):
    from qmamba.evaluation import agreement

    data = {"corpus": str(corpus), "seq_len": 32, "eval_batch_size": 8}
    reports = agreement(checkpoints / "int8.ckpt", data=data, backend="torch", forcings=("op", "block"))
    assert sorted(reports) == ["block", "op"]
    op, block = reports["op"], reports["block"]
    assert [r.point for r in op] == [r.point for r in block] and op
    assert all(r.meets_contract for r in op)
    assert all(b.elements == o.elements for o, b in zip(op, block))
    with pytest.raises(ValueError, match="fp model"):
        agreement(checkpoints / "fp.ckpt", data=data)
