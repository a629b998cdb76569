"""Configs and presets, the Mamba1 / Mamba2 LM: sizes, mamba_ssm parameter names, forward against a written-out
reference, causality, tied weights, backends, generation."""

import math

import pytest
import torch
import torch.nn.functional as F

from qmamba import PRESETS, MambaConfig, MambaLM, preset, set_backend
from qmamba.models import Mamba1Mixer, Mamba2Mixer
from qmamba.ops import selective_scan_loop_ref, ssd_loop_ref

# The model runs in fp32; the written-out reference below uses the sequential-loop scans, also in fp32.
RTOL_FP32, ATOL_FP32 = 1e-4, 1e-5
CAUSAL_ATOL = 1e-6  # logits before a changed token: equal up to fp32 reassociation (in practice bit-equal)

PUBLISHED_MAMBA1 = {"mamba-130m": (768, 24), "mamba-370m": (1024, 48), "mamba-790m": (1536, 48),
                    "mamba-1.4b": (2048, 48), "mamba-2.8b": (2560, 64)}
PUBLISHED_MAMBA2 = {"mamba2-130m": (768, 24), "mamba2-370m": (1024, 48), "mamba2-780m": (1536, 48),
                    "mamba2-1.3b": (2048, 48), "mamba2-2.7b": (2560, 64)}


def _meta_model(cfg: MambaConfig) -> MambaLM:
    with torch.device("meta"):
        return MambaLM(cfg)


# ------------------------------------------------------------------------------------------------ config, presets


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_a_config(name):
    cfg = preset(name)
    assert isinstance(cfg, MambaConfig)
    assert cfg.layer == ("Mamba2" if "mamba2" in name else "Mamba1")
    assert cfg.padded_vocab_size % cfg.pad_vocab_size_multiple == 0 and cfg.padded_vocab_size >= cfg.vocab_size
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg  # plain data round trip
    model = _meta_model(cfg)
    assert len(model.backbone.layers) == cfg.n_layer


def _expected_params(layer, d_model, n_layer, vocab, d_state, pad, d_conv=4, expand=2, headdim=64, ngroups=1):
    """Parameter count of mamba_ssm's MambaLMHeadModel, tied lm_head counted once, written out from the shapes."""
    di = expand * d_model
    if layer == "Mamba1":
        r = math.ceil(d_model / 16)
        mixer = (d_model * 2 * di + di * (d_conv + 1) + di * (r + 2 * d_state) + (r * di + di)
                 + di * d_state + di + di * d_model)
    else:
        h, gn = di // headdim, ngroups * d_state
        mixer = d_model * (2 * di + 2 * gn + h) + (di + 2 * gn) * (d_conv + 1) + 3 * h + di + di * d_model
    padded = (vocab + pad - 1) // pad * pad
    return n_layer * (mixer + d_model) + padded * d_model + d_model


def test_mamba_130m_parameter_count():
    assert _meta_model(preset("mamba-130m")).num_parameters() == 129_135_360  # state-spaces/mamba-130m


@pytest.mark.parametrize("name", list(PUBLISHED_MAMBA1) + list(PUBLISHED_MAMBA2))
def test_published_parameter_counts(name):
    layer = "Mamba2" if name in PUBLISHED_MAMBA2 else "Mamba1"
    d_model, n_layer = {**PUBLISHED_MAMBA1, **PUBLISHED_MAMBA2}[name]
    want = _expected_params(layer, d_model, n_layer, 50277, 16 if layer == "Mamba1" else 128,
                            8 if layer == "Mamba1" else 16)
    model = _meta_model(preset(name))
    assert model.num_parameters() == want
    # the name's size class: within 10% of the advertised size (mamba2-780m is 780M, mamba-2.8b is 2.77B, ...)
    advertised = float(name.split("-")[-1][:-1]) * (1e6 if name.endswith("m") else 1e9)
    assert abs(model.num_parameters() - advertised) / advertised < 0.1


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError) as err:
        preset("mamba-7b")
    assert "mamba-7b" in str(err.value)
    for name in PRESETS:
        assert name in str(err.value)


def test_preset_overrides():
    cfg = preset("tiny", n_layer=3, d_state=4)
    assert (cfg.n_layer, cfg.d_state, cfg.d_model) == (3, 4, preset("tiny").d_model)
    with pytest.raises(ValueError, match="n_layerz"):
        preset("tiny", n_layerz=3)


@pytest.mark.parametrize("bad", [dict(layer="Mamba3"), dict(d_model=0), dict(dt_rank="big"),
                                 dict(layer="Mamba2", d_model=40, headdim=48),
                                 dict(layer="Mamba2", d_model=32, headdim=16, ngroups=3), dict(rms_norm=False)])
def test_invalid_configs_raise(bad):
    with pytest.raises(ValueError):
        MambaConfig(**bad)


def test_config_defaults_follow_mamba_ssm():
    assert MambaConfig(layer="Mamba1").d_state == 16 and MambaConfig(layer="Mamba2").d_state == 128
    cfg = MambaConfig(d_model=100)
    assert cfg.dt_rank_value == 7 and cfg.d_inner == 200
    assert MambaConfig(vocab_size=50277).padded_vocab_size == 50280


# ------------------------------------------------------------------------------------- mamba_ssm parameter names


def _mamba_ssm_names(cfg: MambaConfig) -> dict:
    """mamba_ssm 2.x MambaLMHeadModel state_dict names and shapes, written out by hand for n_layer = 1."""
    d, di, n, k, V = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.padded_vocab_size
    p = "backbone.layers.0.mixer."
    names = {"backbone.embedding.weight": (V, d), "backbone.layers.0.norm.weight": (d,),
             "backbone.norm_f.weight": (d,), "lm_head.weight": (V, d)}
    if cfg.layer == "Mamba1":
        r = cfg.dt_rank_value
        names.update({p + "in_proj.weight": (2 * di, d), p + "conv1d.weight": (di, 1, k), p + "conv1d.bias": (di,),
                      p + "x_proj.weight": (r + 2 * n, di), p + "dt_proj.weight": (di, r), p + "dt_proj.bias": (di,),
                      p + "A_log": (di, n), p + "D": (di,), p + "out_proj.weight": (d, di)})
    else:
        g, h = cfg.ngroups, cfg.nheads
        names.update({p + "in_proj.weight": (2 * di + 2 * g * n + h, d), p + "conv1d.weight": (di + 2 * g * n, 1, k),
                      p + "conv1d.bias": (di + 2 * g * n,), p + "dt_bias": (h,), p + "A_log": (h,), p + "D": (h,),
                      p + "norm.weight": (di,), p + "out_proj.weight": (d, di)})
    return names


@pytest.mark.parametrize("cfg", [
    MambaConfig(d_model=48, n_layer=1, vocab_size=100, d_state=8),
    MambaConfig(d_model=32, n_layer=1, vocab_size=100, layer="Mamba2", d_state=8, headdim=16, ngroups=2),
], ids=["Mamba1", "Mamba2"])
def test_parameter_names_and_shapes_match_mamba_ssm(cfg):
    model = MambaLM(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _mamba_ssm_names(cfg)
    mixer = model.backbone.layers[0].mixer
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay


def test_initialization_follows_mamba_ssm():
    cfg1 = MambaConfig(d_model=64, n_layer=2, vocab_size=64, d_state=8)
    m1 = MambaLM(cfg1).backbone.layers[0].mixer
    # softplus(dt_proj.bias) is a time step in [dt_min, dt_max] (the bias must survive the generic bias zeroing)
    dt = F.softplus(m1.dt_proj.bias)
    assert dt.min() >= cfg1.dt_min * 0.999 and dt.max() <= cfg1.dt_max * 1.001 and dt.std() > 0
    torch.testing.assert_close(m1.A_log, torch.log(torch.arange(1, 9.0)).expand(128, 8))  # S4D-real
    torch.testing.assert_close(m1.D, torch.ones(128))
    cfg2 = MambaConfig(d_model=64, n_layer=2, vocab_size=64, layer="Mamba2", d_state=8, headdim=16)
    m2 = MambaLM(cfg2).backbone.layers[0].mixer
    dt2 = F.softplus(m2.dt_bias)
    assert dt2.min() >= cfg2.dt_min * 0.999 and dt2.max() <= cfg2.dt_max * 1.001
    A = torch.exp(m2.A_log)
    assert A.min() >= 1.0 - 1e-6 and A.max() <= 16.0 + 1e-5


# --------------------------------------------------------------------------------------------- forward, causality


@pytest.mark.parametrize("name", ["tiny", "tiny-mamba2"])
def test_forward_shapes(name):
    cfg = preset(name)
    model = MambaLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 21))
    logits = model(ids)
    assert logits.shape == (3, 21, cfg.padded_vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _mamba1_mixer_reference(m: Mamba1Mixer, u):
    """mamba_ssm's Mamba.forward slow path, written out, with the sequential-loop scan."""
    L = u.shape[1]
    xz = (u @ m.in_proj.weight.T).transpose(1, 2)  # (b, 2 di, L)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, m.conv1d.weight, m.conv1d.bias, padding=m.conv1d.weight.shape[-1] - 1,
                        groups=x.shape[1])[..., :L])
    x_dbl = x.transpose(1, 2) @ m.x_proj.weight.T  # (b, L, r + 2n)
    dt, B, C = x_dbl.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ m.dt_proj.weight.T).transpose(1, 2)  # (b, di, L), bias added by the scan
    y = selective_scan_loop_ref(x, dt, -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2), m.D, z,
                                delta_bias=m.dt_proj.bias, delta_softplus=True)
    return y.transpose(1, 2) @ m.out_proj.weight.T


def _mamba2_mixer_reference(m: Mamba2Mixer, u):
    """mamba_ssm's Mamba2.forward (unfused path), written out, with the sequential-loop SSD and the gated norm."""
    b, L, _ = u.shape
    di, g, n, h, p = m.d_inner, m.ngroups, m.d_state, m.nheads, m.headdim
    z, xBC, dt = (u @ m.in_proj.weight.T).split([di, di + 2 * g * n, h], dim=-1)
    xBC = F.silu(F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.conv1d.weight.shape[-1] - 1,
                          groups=xBC.shape[-1])[..., :L]).transpose(1, 2)
    x, B, C = xBC.split([di, g * n, g * n], dim=-1)
    y = ssd_loop_ref(x.reshape(b, L, h, p), dt, -torch.exp(m.A_log), B.reshape(b, L, g, n), C.reshape(b, L, g, n),
                     D=m.D, dt_bias=m.dt_bias, dt_softplus=True).reshape(b, L, di)
    y = (y * F.silu(z)).reshape(b, L, g, di // g)
    y = _rms(y, 1.0, 1e-5).reshape(b, L, di) * m.norm.weight
    return y @ m.out_proj.weight.T


def _lm_reference(model: MambaLM, ids):
    eps = model.config.norm_epsilon
    ref_mixer = _mamba1_mixer_reference if model.config.layer == "Mamba1" else _mamba2_mixer_reference
    hidden, residual = model.backbone.embedding.weight[ids], None
    for layer in model.backbone.layers:
        residual = hidden if residual is None else hidden + residual
        hidden = ref_mixer(layer.mixer, _rms(residual, layer.norm.weight, eps))
    out = _rms(hidden + residual, model.backbone.norm_f.weight, eps)
    return out @ model.lm_head.weight.T


@pytest.mark.parametrize("cfg", [
    preset("tiny"),
    preset("tiny-mamba2"),
    MambaConfig(d_model=32, n_layer=2, vocab_size=64, layer="Mamba2", d_state=8, headdim=8, ngroups=2, chunk_size=8),
], ids=["tiny", "tiny-mamba2", "mamba2-groups"])
def test_forward_matches_written_out_reference(cfg):
    model = MambaLM(cfg).eval()
    with torch.no_grad():  # make D, dt bias and norms non-trivial so every term is checked
        for name, p in model.named_parameters():
            if name.endswith(("D", "norm.weight", "norm_f.weight")):
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        got, want = model(ids), _lm_reference(model, ids)
    torch.testing.assert_close(got, want, rtol=RTOL_FP32, atol=ATOL_FP32)


@pytest.mark.parametrize("name", ["tiny", "tiny-mamba2"])
def test_lm_is_causal(name):
    cfg = preset(name)
    model = MambaLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))  # several SSD chunks of 16 for tiny-mamba2
    with torch.no_grad():
        base = model(ids)
        for t in (0, 5, 16, 33):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=CAUSAL_ATOL)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-4  # the changed position itself does change


def test_tied_embeddings_share_storage():
    model = MambaLM(preset("tiny"))
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert model.lm_head.weight.data_ptr() == model.backbone.embedding.weight.data_ptr()
    with torch.no_grad():
        model.backbone.embedding.weight[3, 0] = 42.0
    assert model.lm_head.weight[3, 0].item() == 42.0
    # counted once
    assert model.num_parameters() == sum(p.numel() for n, p in model.state_dict().items()) - model.lm_head.weight.numel()

    untied = MambaLM(preset("tiny", tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.backbone.embedding.weight.data_ptr()
    assert untied.num_parameters() == model.num_parameters() + model.lm_head.weight.numel()


def test_backward_reaches_every_parameter():
    for name in ("tiny", "tiny-mamba2"):
        model = MambaLM(preset(name))
        ids = torch.randint(0, 256, (2, 12))
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, (name, pname)


# ---------------------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("name", ["tiny", "tiny-mamba2"])
def test_set_backend_sets_every_part(name):
    model = MambaLM(preset(name))
    parts = [m for m in model.modules() if hasattr(m, "backend")]
    # per layer: conv1d + scan + block norm (+ gated norm for Mamba2); plus norm_f
    per_layer = 3 if name == "tiny" else 4
    assert len(parts) == per_layer * model.config.n_layer + 1
    assert all(m.backend == "auto" for m in parts)
    assert set_backend(model, "torch") is model
    assert all(m.backend == "torch" for m in parts)
    with pytest.raises(ValueError, match="cuda2"):
        set_backend(model, "cuda2")
    assert all(m.backend == "torch" for m in parts)  # a rejected name changes nothing


def test_cuda_backend_on_cpu_model_raises():
    model = set_backend(MambaLM(preset("tiny")), "cuda")
    with pytest.raises(RuntimeError, match=r"qmamba\[cuda\]"):
        model(torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def small_vocab_model():
    """vocab 250 padded to 256, with the padding logits forced far above the rest: a sampler that looks at
    padding columns would pick them every time."""
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=250)
    assert cfg.padded_vocab_size == 256
    model = MambaLM(cfg).eval()

    def boost_padding(module, args, out):
        out = out.clone()
        out[..., cfg.vocab_size:] = 1e4
        return out

    model.lm_head.register_forward_hook(boost_padding)
    return model


def test_generate_greedy_is_deterministic_and_argmax(small_vocab_model):
    model = small_vocab_model
    prompt = torch.randint(0, 250, (2, 5))
    a = model.generate(prompt, 6, temperature=0)
    b = model.generate(prompt, 6, temperature=0)
    assert a.shape == (2, 11)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt)
    # each new token is the argmax over the real vocabulary given everything before it
    with torch.no_grad():
        logits = model(a[:, :-1])[..., :250]
    assert torch.equal(a[:, 5:], logits[:, 4:].argmax(-1))


def test_generate_sampling_is_reproducible_with_a_generator(small_vocab_model):
    model = small_vocab_model
    prompt = torch.randint(0, 250, (3, 4))

    def sample(seed, **kw):
        return model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert sample(7).shape == (3, 16)
    # top_k = 1 is greedy whatever the seed
    assert torch.equal(sample(3, top_k=1), model.generate(prompt, 12, temperature=0))


def test_generate_never_emits_padding_tokens(small_vocab_model):
    prompt = torch.randint(0, 250, (4, 3))
    for kw in (dict(temperature=0), dict(temperature=1.0), dict(temperature=2.0, top_k=300), dict(top_k=5)):
        out = small_vocab_model.generate(prompt, 10, generator=torch.Generator().manual_seed(1), **kw)
        assert out.shape == (4, 13)
        assert out.max().item() < 250 and out.min().item() >= 0, kw


def test_generate_context_window(small_vocab_model):
    # with context = 3 only the last 3 tokens matter: prompts that differ earlier generate the same greedy tokens
    p1 = torch.tensor([[1, 2, 3, 10, 11, 12]])
    p2 = torch.tensor([[9, 8, 7, 10, 11, 12]])
    g1 = small_vocab_model.generate(p1, 4, temperature=0, context=3)
    g2 = small_vocab_model.generate(p2, 4, temperature=0, context=3)
    assert torch.equal(g1[:, 6:], g2[:, 6:])
    assert torch.equal(g1[:, :6], p1)
