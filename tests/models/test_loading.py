"""Saving and loading: our folders, hand-written mamba_ssm and Hugging Face (-hf) folders, hub ids through the real
huggingface_hub cache code (offline), Lightning checkpoints, and the errors for sources that do not fit."""

import json

import pytest
import torch

from qmamba import MambaConfig, MambaLM, from_pretrained, load_model, preset, save_pretrained
from qmamba.models.loading import CHECKPOINT_KEY

# Loading copies tensors bit for bit and the forward is deterministic: logits must be identical.
RTOL_LOGITS, ATOL_LOGITS = 0.0, 0.0

# mamba_ssm 2.x: fields of mamba_ssm.models.config_mamba.MambaConfig, and the keyword arguments of the mixers that
# MambaLMHeadModel builds from ssm_cfg (plus "layer", which create_block pops)
MAMBA_SSM_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                           "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                           "tie_embeddings"}
MAMBA1_KWARGS = {"layer", "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                 "dt_init_floor", "conv_bias", "bias", "use_fast_path"}
MAMBA2_KWARGS = {"layer", "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
                 "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias",
                 "conv_bias", "chunk_size", "use_mem_eff_path"}

MAMBA2_GROUPED = dict(d_model=32, n_layer=2, vocab_size=100, layer="Mamba2", d_state=8, headdim=16, ngroups=2,
                      chunk_size=8)


def _logits(model: MambaLM, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(ids)


def _assert_same_model(loaded: MambaLM, source: MambaLM):
    got, want = loaded.state_dict(), source.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    torch.testing.assert_close(_logits(loaded), _logits(source), rtol=RTOL_LOGITS, atol=ATOL_LOGITS)


def _perturbed(model: MambaLM) -> MambaLM:
    """Make every parameter differ from its init, so a loader that silently keeps an init is caught."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------ our own save / load


@pytest.mark.parametrize("cfg", [preset("tiny"), MambaConfig(**MAMBA2_GROUPED),
                                 preset("tiny", tie_embeddings=False)], ids=["Mamba1", "Mamba2", "Mamba1-untied"])
def test_save_load_round_trip(tmp_path, cfg):
    source = _perturbed(MambaLM(cfg))
    folder = save_pretrained(source, tmp_path / "model")
    assert (folder / "config.json").exists() and (folder / "pytorch_model.bin").exists()
    loaded = from_pretrained(folder)
    assert loaded.config == cfg
    _assert_same_model(loaded, source)
    tied = loaded.lm_head.weight.data_ptr() == loaded.backbone.embedding.weight.data_ptr()
    assert tied == cfg.tie_embeddings
    # load_model and a str path take the same route
    _assert_same_model(load_model(str(folder)), source)


@pytest.mark.parametrize("cfg", [preset("tiny"), MambaConfig(**MAMBA2_GROUPED)], ids=["Mamba1", "Mamba2"])
def test_saved_config_is_mamba_ssm_config(tmp_path, cfg):
    save_pretrained(MambaLM(cfg), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert set(raw) <= MAMBA_SSM_CONFIG_FIELDS
    assert (raw["d_model"], raw["n_layer"], raw["vocab_size"]) == (cfg.d_model, cfg.n_layer, cfg.vocab_size)
    assert raw["d_intermediate"] == 0 and raw["attn_layer_idx"] == [] and raw["rms_norm"] is True
    assert raw["pad_vocab_size_multiple"] == cfg.pad_vocab_size_multiple
    assert raw["ssm_cfg"]["layer"] == cfg.layer and raw["ssm_cfg"]["d_state"] == cfg.d_state
    assert set(raw["ssm_cfg"]) <= (MAMBA1_KWARGS if cfg.layer == "Mamba1" else MAMBA2_KWARGS)
    if cfg.layer == "Mamba2":
        assert (raw["ssm_cfg"]["headdim"], raw["ssm_cfg"]["ngroups"], raw["ssm_cfg"]["chunk_size"]) == (16, 2, 8)
    else:
        assert raw["ssm_cfg"]["dt_rank"] == cfg.dt_rank
    # the weights file holds mamba_ssm's names, the tied lm_head included (MambaLMHeadModel loads it strictly)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" in state and "backbone.embedding.weight" in state


# -------------------------------------------------------------------------------- hand-written mamba_ssm folders


def _mamba_ssm_state_dict(d, n_layer, vocab_padded, layer, d_state, d_conv=4, expand=2, headdim=64, ngroups=1,
                          lm_head=True):
    """A state dict with mamba_ssm's names and shapes, written out independently of qmamba's modules."""
    di = expand * d
    state = {"backbone.embedding.weight": torch.randn(vocab_padded, d) * 0.02}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        state[p + "norm.weight"] = 1 + 0.1 * torch.randn(d)
        m = p + "mixer."
        if layer == "Mamba1":
            r = -(-d // 16)
            shapes = {"A_log": (di, d_state), "D": (di,), "in_proj.weight": (2 * di, d), "conv1d.weight": (di, 1, d_conv),
                      "conv1d.bias": (di,), "x_proj.weight": (r + 2 * d_state, di), "dt_proj.weight": (di, r),
                      "dt_proj.bias": (di,), "out_proj.weight": (d, di)}
        else:
            h, gn = di // headdim, ngroups * d_state
            shapes = {"dt_bias": (h,), "A_log": (h,), "D": (h,), "in_proj.weight": (2 * di + 2 * gn + h, d),
                      "conv1d.weight": (di + 2 * gn, 1, d_conv), "conv1d.bias": (di + 2 * gn,),
                      "norm.weight": (di,), "out_proj.weight": (d, di)}
        for name, shape in shapes.items():
            state[m + name] = 0.2 * torch.randn(shape)
        state[m + "A_log"] = torch.rand(shapes["A_log"]) * 2  # A = -exp(A_log) in [-7.4, -1]
    state["backbone.norm_f.weight"] = 1 + 0.1 * torch.randn(d)
    if lm_head:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    return state


def test_mamba_ssm_folder_mamba1(tmp_path):
    # state-spaces/mamba-130m's config.json, with tiny dims (the old format: no d_intermediate, no ssm_cfg.layer)
    config = {"d_model": 32, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = _mamba_ssm_state_dict(32, 2, 104, "Mamba1", d_state=16)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = from_pretrained(tmp_path)
    cfg = model.config
    assert (cfg.layer, cfg.d_model, cfg.n_layer, cfg.d_state, cfg.dt_rank_value, cfg.padded_vocab_size) == \
           ("Mamba1", 32, 2, 16, 2, 104)
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    assert model.lm_head.weight.data_ptr() == model.backbone.embedding.weight.data_ptr()
    assert torch.isfinite(_logits(model)).all()


def test_mamba_ssm_folder_mamba2_without_lm_head(tmp_path):
    # state-spaces/mamba2-130m's config.json, with tiny dims; the tied lm_head may be absent from the weights
    config = {"d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 100,
              "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 32}, "attn_layer_idx": [], "attn_cfg": {},
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
              "tie_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = _mamba_ssm_state_dict(64, 2, 112, "Mamba2", d_state=16, headdim=32, lm_head=False)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = from_pretrained(tmp_path)
    assert (model.config.layer, model.config.nheads, model.config.padded_vocab_size) == ("Mamba2", 4, 112)
    got = model.state_dict()
    assert set(got) == set(state) | {"lm_head.weight"}
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    assert torch.equal(got["lm_head.weight"], state["backbone.embedding.weight"])


# ------------------------------------------------------------------------------------- Hugging Face -hf folders


def _hf_config(cfg: MambaConfig, tie: bool) -> dict:
    """A transformers config.json (MambaForCausalLM / Mamba2ForCausalLM) for ``cfg``; vocab already padded."""
    common = {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "state_size": cfg.d_state,
              "expand": cfg.expand, "conv_kernel": cfg.d_conv, "vocab_size": cfg.padded_vocab_size,
              "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True, "tie_word_embeddings": tie,
              "residual_in_fp32": True, "torch_dtype": "float32", "pad_token_id": 0, "bos_token_id": 0}
    if cfg.layer == "Mamba1":
        return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "time_step_rank": cfg.dt_rank_value,
                "intermediate_size": cfg.d_inner, **common}
    return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "head_dim": cfg.headdim,
            "n_groups": cfg.ngroups, "num_heads": cfg.nheads, "chunk_size": cfg.chunk_size, "rms_norm": True,
            "norm_before_gate": False, **common}


def _hf_state_dict(model: MambaLM, with_lm_head: bool) -> dict:
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v.clone() for k, v in model.state_dict().items()}
    if not with_lm_head:
        del state["lm_head.weight"]
    return state


HF_CASES = [
    ("mamba-tied", dict(d_model=32, n_layer=2, vocab_size=104, d_state=8, pad_vocab_size_multiple=1), True),
    ("mamba-untied", dict(d_model=32, n_layer=2, vocab_size=104, d_state=8, pad_vocab_size_multiple=1), False),
    ("mamba2-tied", {**MAMBA2_GROUPED, "vocab_size": 104, "pad_vocab_size_multiple": 1}, True),
    ("mamba2-untied", {**MAMBA2_GROUPED, "vocab_size": 104, "pad_vocab_size_multiple": 1}, False),
]


@pytest.mark.parametrize("name,fields,tie", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_folder_pytorch_bin(tmp_path, name, fields, tie):
    source = _perturbed(MambaLM(MambaConfig(**fields, tie_embeddings=tie)))
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(source.config, tie)))
    torch.save(_hf_state_dict(source, with_lm_head=True), tmp_path / "pytorch_model.bin")
    loaded = from_pretrained(tmp_path)
    assert loaded.config.layer == source.config.layer and loaded.config.tie_embeddings == tie
    assert loaded.config.padded_vocab_size == 104  # no second padding of an already padded vocabulary
    _assert_same_model(loaded, source)


@pytest.mark.parametrize("name,fields", [(c[0], c[1]) for c in HF_CASES if c[2]], ids=["mamba", "mamba2"])
def test_hf_folder_safetensors(tmp_path, name, fields):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = _perturbed(MambaLM(MambaConfig(**fields)))
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(source.config, True)))
    # transformers saves tied weights once (safetensors refuses shared storage)
    safetensors_torch.save_file({k: v.contiguous() for k, v in _hf_state_dict(source, False).items()},
                                str(tmp_path / "model.safetensors"))
    _assert_same_model(from_pretrained(tmp_path), source)


def test_hf_unknown_model_type(tmp_path):
    config = _hf_config(preset("tiny"), True)
    config["model_type"] = "falcon_mamba"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="falcon_mamba"):
        from_pretrained(tmp_path)


# -------------------------------------------------------------------------------- hub id, offline, through the cache


def _hub_cache(root, repo_id: str, files: dict) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, write in files.items():
        write(snap / name)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty offline hub cache in tmp_path, set both in the environment and in huggingface_hub's constants (read
    at import time, used at call time), and a working directory where no hub id exists as a local folder."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return cache


def test_hub_id_loads_from_offline_cache(offline_hub):
    source = _perturbed(MambaLM(preset("tiny-mamba2")))
    _hub_cache(offline_hub, "org/tiny-mamba2", {
        "config.json": lambda p: p.write_text(json.dumps(source.config.to_mamba_ssm())),
        "pytorch_model.bin": lambda p: torch.save(source.state_dict(), p),
    })
    loaded = from_pretrained("org/tiny-mamba2")
    assert loaded.config == source.config
    _assert_same_model(loaded, source)
    _assert_same_model(load_model("org/tiny-mamba2"), source)


def test_hub_id_hf_layout_from_offline_cache(offline_hub):
    source = _perturbed(MambaLM(MambaConfig(**HF_CASES[0][1])))
    _hub_cache(offline_hub, "org/tiny-mamba-hf", {
        "config.json": lambda p: p.write_text(json.dumps(_hf_config(source.config, True))),
        "pytorch_model.bin": lambda p: torch.save(_hf_state_dict(source, True), p),
    })
    _assert_same_model(from_pretrained("org/tiny-mamba-hf"), source)


def test_hub_id_not_in_offline_cache(offline_hub):
    with pytest.raises(FileNotFoundError, match="org/not-cached"):
        from_pretrained("org/not-cached")


# -------------------------------------------------------------------------------------------- Lightning checkpoints


def test_lightning_checkpoint_loads(tmp_path):
    source = _perturbed(MambaLM(preset("tiny")))
    ckpt = {CHECKPOINT_KEY: {"config": source.config.to_dict()},
            "state_dict": {"model." + k: v for k, v in source.state_dict().items()}, "epoch": 0}
    torch.save(ckpt, tmp_path / "last.ckpt")
    _assert_same_model(load_model(tmp_path / "last.ckpt"), source)


def test_checkpoint_without_qmamba_entry(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=CHECKPOINT_KEY):
        load_model(tmp_path / "other.ckpt")


# ---------------------------------------------------------------------------------------------------------- errors


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(str(missing))


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_model(tmp_path / "missing.ckpt")
    assert "missing.ckpt" in str(err.value)
    assert "python train.py --config configs/pretrain.yaml" in str(err.value)


def test_folder_without_config_or_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "empty")
    save_pretrained(MambaLM(preset("tiny")), tmp_path / "noweights")
    (tmp_path / "noweights" / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        from_pretrained(tmp_path / "noweights")


def test_file_instead_of_folder(tmp_path):
    save_pretrained(MambaLM(preset("tiny")), tmp_path)
    with pytest.raises(ValueError, match="folder"):
        from_pretrained(tmp_path / "config.json")


def test_weights_not_fitting_config_name_the_keys(tmp_path):
    save_pretrained(MambaLM(preset("tiny")), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    # one layer more than the weights have: missing keys of layer 2
    (tmp_path / "config.json").write_text(json.dumps({**raw, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"missing keys: \['backbone\.layers\.2\.") as err:
        from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)
    # one layer fewer: unexpected keys of layer 1
    (tmp_path / "config.json").write_text(json.dumps({**raw, "n_layer": 1}))
    with pytest.raises(ValueError, match=r"unexpected keys: \['backbone\.layers\.1\."):
        from_pretrained(tmp_path)


def test_weights_with_wrong_shapes_name_the_key(tmp_path):
    save_pretrained(MambaLM(preset("tiny")), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["ssm_cfg"]["d_state"] = 4  # the weights have d_state 8
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="A_log") as err:
        from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("extra,word", [({"attn_layer_idx": [1]}, "attn_layer_idx"),
                                        ({"d_intermediate": 128}, "d_intermediate")])
def test_hybrid_mamba_ssm_configs_are_refused(tmp_path, extra, word):
    save_pretrained(MambaLM(preset("tiny")), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, **extra}))
    with pytest.raises(ValueError, match=word):
        from_pretrained(tmp_path)
