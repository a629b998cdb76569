"""Codes between parts (``qmamba.qnn.codes``): in int8 mode Mamba1's conv1d hands x_proj and the scan their int8
codes straight from one conv op (single-scale u, and dual-scale u in both encodings), and the model's output is the
same, bit for bit, as when each consumer quantizes the conv's float output itself (``emit_codes = False``): forward,
prefill and decode steps. Codes go only where every consumer takes them; elsewhere the float output flows as before.
Decoding, dt_proj goes one step further: it hands the scan its GEMV's inputs (``DtProjection``) and the scan's update
makes the delta codes itself, with the same logits as dt_proj's own GEMV feeding the scan.
"""

from pathlib import Path

import pytest
import torch

import qmamba
from qmamba.models import MambaLM
from qmamba.ops.int8_hadamard import hadamard_quantize_ref
from qmamba.ops.int8_selective_scan import RotatedOutput
from qmamba.qnn import calibrate, convert, prepare, set_mode
from qmamba.qnn import modules as qmodules
from qmamba.qnn.codes import Codes
from qmamba.qnn.modules import QuantCausalConv1d, QuantSelectiveScan
from qmamba.quant.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"
GROUPS = ["baseline", "treatment", "treatment_piecewise"]


def _ids(batch=2, L=21, seed=1):
    return torch.randint(0, 256, (batch, L), generator=torch.Generator().manual_seed(seed))


def _model(recipe):
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset("tiny")).eval(), load_recipe(str(recipe)))
    with torch.no_grad():  # outliers in u, so the dual-scale groups use their outlier scale
        for layer in model.backbone.layers:
            layer.mixer.conv1d.weight[::7] *= 8
    calibrate(model, [_ids(seed=s) for s in (10, 11)], progress=False)
    set_mode(model, "int8")
    return model


def _convs(model):
    return [m for m in model.modules() if isinstance(m, QuantCausalConv1d)]


def _emit(model, on: bool):
    for conv in _convs(model):
        conv.emit_codes = on


def _forbid_own_quantize(model, monkeypatch):
    """x_proj.input and scan.u may no longer quantize anything themselves: their codes must come from the conv."""
    def refuse(*args, **kw):
        raise AssertionError("a consumer quantized the conv's float output although the conv handed it codes")

    for layer in model.backbone.layers:
        for point in (layer.mixer.x_proj.q("input"), layer.mixer.scan.q("u")):
            for name in ("quantize", "codes", "dual_codes"):
                monkeypatch.setattr(point, name, refuse)


def _decode(model, ids, steps=4):
    cache = model.allocate_cache(ids.shape[0])
    out = [model.prefill(ids, cache)]
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        out.append(model.step(torch.randint(0, 256, (ids.shape[0],), generator=g), cache))
    return out


@pytest.mark.parametrize("group", GROUPS)
def test_codes_equal_float_handoff_bit_for_bit(group, monkeypatch):
    model = _model(RECIPES / f"dual_scale_{group}_mamba1.yaml")
    x = _ids(seed=5)
    with torch.no_grad():
        _emit(model, False)
        plain, plain_dec = model(x), _decode(model, x)
        _emit(model, True)
        _forbid_own_quantize(model, monkeypatch)
        fused, fused_dec = model(x), _decode(model, x)
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_dec, plain_dec))


def test_conv_hands_codes_only_when_every_consumer_takes_them():
    model = _model(RECIPES / "dual_scale_treatment_mamba1.yaml")
    mixer = model.backbone.layers[0].mixer
    x = torch.randn(2, mixer.d_inner, 9)
    with torch.no_grad():
        to_xproj, u = mixer.conv1d(x, mixer.conv_consumers())
        assert isinstance(to_xproj, Codes) and isinstance(u, Codes)
        assert to_xproj.dual is None and u.dual is not None and u.dual.encoding == "mask" and u.mask is not None
        assert to_xproj.dtype == u.dtype == x.dtype
        # the same codes each consumer makes from the float output itself
        xp, sc = mixer.x_proj.q("input"), mixer.scan.q("u")
        mixer.conv1d.emit_codes = False
        y, y2 = mixer.conv1d(x, mixer.conv_consumers())
        assert y is y2 and isinstance(y, torch.Tensor)
        assert torch.equal(to_xproj.q, xp.quantize(y)[0])
        q, mask, s_in, s_out = sc.dual_codes(y)
        assert torch.equal(u.q, q) and torch.equal(u.mask, mask) and torch.equal(u.scale, s_in)
        mixer.conv1d.emit_codes = True

        # a watched consumer (an observer calibrating, a probe) needs the float tensor: no codes for anyone
        sc.probe = lambda point, t: None
        outs = mixer.conv1d(x, mixer.conv_consumers())
        assert all(isinstance(o, torch.Tensor) for o in outs)
        sc.probe = None
        # fakequant / fp: the float output
        for mode in ("fakequant", "fp"):
            set_mode(model, mode)
            assert all(isinstance(o, torch.Tensor) for o in mixer.conv1d(x, mixer.conv_consumers()))
        set_mode(model, "int8")


def test_rotated_or_float_consumer_gets_the_float_output():
    model = _model(RECIPES / "dual_scale_baseline_mamba1.yaml")
    mixer = model.backbone.layers[0].mixer
    x = torch.randn(1, mixer.d_inner, 5)
    with torch.no_grad():
        assert isinstance(mixer.conv1d(x, mixer.conv_consumers())[0], Codes)
        # out_proj's input is Hadamard-rotated in this recipe: it needs the float tensor to rotate
        assert not mixer.out_proj.takes_codes("input") and mixer.x_proj.takes_codes("input")
        assert not mixer.x_proj.takes_codes("weight") and mixer.scan.takes_codes("delta")
        outs = mixer.conv1d(x, ((mixer.x_proj, "input"), (mixer.out_proj, "input")))
        assert all(isinstance(o, torch.Tensor) for o in outs)


def test_codes_transpose_and_errors():
    q = torch.randint(-128, 128, (2, 3, 4), dtype=torch.int8)
    c = Codes(q, torch.ones(1, 1, 1), torch.float32)
    t = c.transpose(1, 2)
    assert t.shape == (2, 4, 3) and torch.equal(t.q, q.transpose(1, 2)) and t.dtype == torch.float32
    with pytest.raises(TypeError, match="int8"):
        Codes(q.float(), torch.ones(()), torch.float32)
    masked = Codes(q, torch.ones(()), torch.float32, mask=torch.zeros(2, 3, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="cannot be transposed"):
        masked.transpose(1, 2)


def _blocks_emit(model, on: bool):
    for layer in model.backbone.layers:
        layer.emit_codes = on


@pytest.mark.parametrize("preset, recipe", [("tiny", "quamba_w8a8"), ("tiny-mamba2", "quamba2_w8a8"),
                                            ("tiny", "dual_scale_treatment_mamba1.yaml")])
def test_pre_norm_hands_in_proj_its_codes_bit_for_bit(preset, recipe, monkeypatch):
    """int8: each block's residual add + RMSNorm + in_proj's quantize run as one op (``add_rmsnorm_quant``), and
    in_proj takes its codes: forward, prefill and decode give the same logits, bit for bit, as the float norm with
    in_proj quantizing its input itself; in_proj's own quantize is not called."""
    torch.manual_seed(0)
    cfg = qmamba.preset(preset)
    spec = load_recipe(str(RECIPES / recipe)) if recipe.endswith(".yaml") else recipe
    model = prepare(MambaLM(cfg).eval(), spec)
    calibrate(model, [_ids(seed=s) for s in (10, 11)], progress=False)
    set_mode(model, "int8")
    x = _ids(seed=5)
    assert all(layer.mixer.in_proj.takes_codes("input") for layer in model.backbone.layers)
    with torch.no_grad():
        _blocks_emit(model, False)
        plain, plain_dec = model(x), _decode(model, x)
        _blocks_emit(model, True)

        def refuse(*args, **kw):
            raise AssertionError("in_proj quantized its input although the pre-norm handed it codes")

        for layer in model.backbone.layers:
            for name in ("quantize", "codes"):
                monkeypatch.setattr(layer.mixer.in_proj.q("input"), name, refuse)
        fused, fused_dec = model(x), _decode(model, x)
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_dec, plain_dec))


def _linears_emit(model, on: bool):
    for layer in model.backbone.layers:
        for name in ("in_proj", "x_proj", "dt_proj"):
            getattr(layer.mixer, name).emit_codes = on


@pytest.mark.parametrize("group", ["baseline", "treatment"])
def test_linears_hand_their_consumers_codes_bit_for_bit(group, monkeypatch):
    """int8 Mamba1 forward, prefill and decode: in_proj emits the conv's input and the scan's z codes, x_proj
    dt_proj's input and the scan's B and C, dt_proj the scan's delta, each in its consumer's scale (one
    ``w8a8_linear`` with segment out_scales: the GEMM on a sequence, the GEMV on a token); the logits equal, bit for
    bit, those of each consumer quantizing the float slice itself, and no consumer quantizes anything."""
    model = _model(RECIPES / f"dual_scale_{group}_mamba1.yaml")
    x = _ids(seed=5)
    mixer = model.backbone.layers[0].mixer
    assert mixer.conv1d.takes_codes("input") and all(mixer.scan.takes_codes(p) for p in ("z", "delta", "B", "C"))
    with torch.no_grad():
        _linears_emit(model, False)
        plain, plain_dec = model(x), _decode(model, x)
        _linears_emit(model, True)

        def refuse(*args, **kw):
            raise AssertionError("a consumer quantized a linear's float output although the linear handed it codes")

        for layer in model.backbone.layers:
            m = layer.mixer
            for point in (m.conv1d.q("input"), m.dt_proj.q("input"), *(m.scan.q(p) for p in ("z", "delta", "B", "C"))):
                for name in ("quantize", "codes"):
                    monkeypatch.setattr(point, name, refuse)
        fused, fused_dec = model(x), _decode(model, x)
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_dec, plain_dec))


@pytest.mark.parametrize("recipe", ["quamba2_w8a8", "dual_scale_treatment_mamba2.yaml"])
def test_mamba2_in_proj_hands_z_xbc_dt_their_codes_bit_for_bit(recipe, monkeypatch):
    """int8 Mamba2 forward, prefill and decode: in_proj emits the gated norm's z, the conv's input (xBC) and the
    scan's dt codes, each in its consumer's per-tensor scale (one ``w8a8_linear`` with three segment scales); the
    logits equal, bit for bit, those of each consumer quantizing its float slice itself, and none of them does."""
    torch.manual_seed(0)
    spec = load_recipe(str(RECIPES / recipe)) if recipe.endswith(".yaml") else recipe
    model = prepare(MambaLM(qmamba.preset("tiny-mamba2", ngroups=2)).eval(), spec)
    calibrate(model, [_ids(seed=s) for s in (10, 11)], progress=False)
    set_mode(model, "int8")
    x = _ids(seed=5)
    for layer in model.backbone.layers:
        m = layer.mixer
        assert all(part.takes_codes(point) for part, point, _ in m.in_proj_consumers())
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.in_proj.emit_codes = False
        plain, plain_dec = model(x), _decode(model, x)
        for layer in model.backbone.layers:
            layer.mixer.in_proj.emit_codes = True

        def refuse(*args, **kw):
            raise AssertionError("a consumer quantized in_proj's float output although in_proj handed it codes")

        for layer in model.backbone.layers:
            for part, point, _ in layer.mixer.in_proj_consumers():
                for name in ("quantize", "codes", "roundtrip"):
                    monkeypatch.setattr(part.q(point), name, refuse)
        fused, fused_dec = model(x), _decode(model, x)
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_dec, plain_dec))


@pytest.mark.parametrize("recipe", ["quamba2_w8a8", "dual_scale_treatment_mamba2.yaml"])
def test_mamba2_norm_hands_out_proj_its_rotated_codes_bit_for_bit(recipe, monkeypatch):
    """int8 Mamba2 (one norm group): the gated norm, out_proj's Hadamard rotation and its quantize run as one op
    (``gated_rms_norm_hadamard_quantize``) and out_proj takes the codes: forward, prefill and decode give the logits
    of the float norm with out_proj rotating and quantizing its input itself, bit for bit, and out_proj does not."""
    import qmamba.qnn.modules as modules

    torch.manual_seed(0)
    spec = load_recipe(str(RECIPES / recipe)) if recipe.endswith(".yaml") else recipe
    model = prepare(MambaLM(qmamba.preset("tiny-mamba2")).eval(), spec)
    calibrate(model, [_ids(seed=s) for s in (10, 11)], progress=False)
    set_mode(model, "int8")
    x = _ids(seed=5)
    norms = [layer.mixer.norm for layer in model.backbone.layers]
    assert all(layer.mixer.out_proj.takes_rotated_codes() for layer in model.backbone.layers)
    with torch.no_grad():
        for n in norms:
            n.emit_codes = False
        plain, plain_dec = model(x), _decode(model, x)
        for n in norms:
            n.emit_codes = True

        def refuse(*args, **kw):
            raise AssertionError("out_proj rotated and quantized its input although the norm handed it codes")

        monkeypatch.setattr(modules, "hadamard_quantize", refuse)
        fused, fused_dec = model(x), _decode(model, x)
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_dec, plain_dec))


def test_linear_step_with_consumers_on_float_layers_gives_column_slices():
    model = _model(RECIPES / "dual_scale_baseline_mamba1.yaml")
    mixer = model.backbone.layers[0].mixer
    set_mode(model, "fp")
    h = torch.randn(2, mixer.in_proj.in_features)
    with torch.no_grad():
        x, z = mixer.in_proj.step(h, ((mixer.conv1d, "input", mixer.d_inner), (mixer.scan, "z", mixer.d_inner)))
        y = mixer.in_proj.step(h)
    assert isinstance(x, torch.Tensor) and torch.equal(torch.cat([x, z], -1), y)


def test_memos_follow_their_tensors():
    """-exp(A_log) and a linear's per-column requant scales are made once per value of what they come from: an
    in-place change, a replacement (even one at the same address) or a move makes them anew."""
    from qmamba.qnn.modules import memo_hit, memo_key

    model = _model(RECIPES / "dual_scale_baseline_mamba1.yaml")
    mixer = model.backbone.layers[0].mixer
    a = mixer.scan._neg_exp(mixer.A_log)
    assert mixer.scan._neg_exp(mixer.A_log) is a and torch.equal(a, -torch.exp(mixer.A_log.float()))
    with torch.no_grad():
        mixer.A_log.mul_(1.5)
    assert torch.equal(mixer.scan._neg_exp(mixer.A_log), -torch.exp(mixer.A_log.float()))
    other = mixer.A_log.detach().clone()
    assert not memo_hit(memo_key((mixer.A_log,)), (other,))  # another tensor, whatever its address and version

    x = _ids(seed=5)
    with torch.no_grad():
        _linears_emit(model, False)
        plain = model(x)
        _linears_emit(model, True)
        assert torch.equal(model(x), plain)
        scale = mixer.scan.q("z").scale
        scale.mul_(2.0)  # an in-place change (a re-calibration): the memoized per-column scales must follow
        _linears_emit(model, False)
        plain = model(x)
        _linears_emit(model, True)
        assert torch.equal(model(x), plain)


@pytest.mark.parametrize("preset, recipe", [("tiny", "quamba_w8a8"), ("tiny-mamba2", "quamba2_w8a8"),
                                            ("tiny-mamba2", "qat_w8a8")])
def test_all_hand_offs_off_is_the_same_model(preset, recipe):
    """Every hand-off of codes off (``emit_codes`` / ``float_inputs``: benchmarks/latency.py's "qmamba int8 unfused"
    engine) gives, on the torch backend, the same logits as all of them on, bit for bit: forward, prefill, decode."""
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset(preset)).eval(), recipe)
    calibrate(model, [_ids(seed=s) for s in (10, 11)], progress=False)
    set_mode(model, "int8")
    x = _ids(seed=5)

    def hand_offs(on):
        flags = [(m, f) for m in model.modules() for f in ("emit_codes", "float_inputs", "emit_rotated")
                 if hasattr(m, f)]
        assert flags
        for m, f in flags:
            setattr(m, f, on)

    with torch.no_grad():
        hand_offs(False)
        plain, plain_dec = model(x), _decode(model, x)
        hand_offs(True)
        fused, fused_dec = model(x), _decode(model, x)
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_dec, plain_dec))


# Mamba1's decode fusions: (the switch's owner, the switch, the parts whose own step the fused op replaces, the
# qmamba.qnn.modules functions it replaces)
FUSIONS = {"dt_proj into the scan update": (lambda m: m.scan, "fuse_dt_proj", ("dt_proj",), ()),
           "conv update into in_proj's GEMV": (lambda m: m.conv1d, "fuse_in_proj", ("in_proj", "conv1d"), ()),
           "out_proj's Hadamard + quantize into the scan update": (lambda m: m.scan, "emit_rotated", (),
                                                                    ("hadamard_quantize",))}


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("converted", [True, False], ids=["converted", "prepared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("recipe", ["quamba_w8a8", "quamba_w8a8_per_channel_weights.yaml",
                                    "dual_scale_treatment_mamba1.yaml"])
def test_decode_fusion_bit_for_bit(recipe, dtype, converted, fusion, monkeypatch):
    """int8 Mamba1 decode on the torch backend: with a fusion on (dt_proj computed inside the scan's update; the
    conv update run in in_proj's GEMV epilogue) the prefill and step logits equal, bit for bit, those of the parts'
    own steps (the switch off); fused, the replaced parts' steps are never called."""
    owner, switch, replaced, replaced_fns = FUSIONS[fusion]
    torch.manual_seed(0)
    spec = load_recipe(str(RECIPES / recipe)) if recipe.endswith(".yaml") else recipe
    model = prepare(MambaLM(qmamba.preset("tiny")).eval(), spec).to(dtype)
    calibrate(model, [_ids(seed=s) for s in (10, 11)], progress=False)
    if converted:
        convert(model)  # int8 weights stored as codes; prepared: quantized at each step
    set_mode(model, "int8")
    x = _ids(seed=5)
    mixers = [layer.mixer for layer in model.backbone.layers]
    assert all(isinstance(m.scan, QuantSelectiveScan) and m.scan.takes_projection("delta") for m in mixers)
    assert all(m.conv1d.takes_projected_input(m.conv_consumers()) for m in mixers)
    assert all(m.out_proj.takes_rotated_codes() for m in mixers)  # so emit_rotated on makes the update rotate

    def fuse(on: bool):
        for m in mixers:
            setattr(owner(m), switch, on)

    with torch.no_grad():
        fuse(False)
        unfused = _decode(model, x)
        fuse(True)
        for m in mixers:
            def refuse(*args, **kw):
                raise AssertionError(f"{replaced} ran its own step although the fused op ({fusion}) runs it")

            for name in replaced:
                monkeypatch.setattr(getattr(m, name), "step", refuse)
        for name in replaced_fns:  # the prefill still calls them (3-D inputs); a step (2-D) must not
            def refuse_in_step(x, *args, _fn=getattr(qmodules, name), **kw):
                if x.dim() == 2:
                    refuse()
                return _fn(x, *args, **kw)

            monkeypatch.setattr(qmodules, name, refuse_in_step)
        fused = _decode(model, x)
    assert fused[-1].dtype == dtype
    assert all(torch.equal(a, b) for a, b in zip(fused, unfused))


def test_dt_proj_fusion_only_where_the_scan_takes_delta_codes():
    """No projection where the scan would not take delta's codes (fp / fakequant modes, dt_proj not emitting codes,
    fuse_dt_proj off): dt_proj runs its own step, as before; a scan handed one it cannot take says what to do."""
    model = _model(RECIPES / "dual_scale_baseline_mamba1.yaml")
    mixer = model.backbone.layers[0].mixer
    dt = torch.randn(2, mixer.dt_rank)
    consumer = (mixer.scan, "delta")
    assert mixer.dt_proj.step_projection(dt, consumer) is not None
    mixer.dt_proj.emit_codes = False
    assert mixer.dt_proj.step_projection(dt, consumer) is None
    mixer.dt_proj.emit_codes = True
    mixer.scan.fuse_dt_proj = False
    assert mixer.dt_proj.step_projection(dt, consumer) is None
    mixer.scan.fuse_dt_proj = True
    projection = mixer.dt_proj.step_projection(dt, consumer)
    set_mode(model, "fakequant")
    assert mixer.dt_proj.step_projection(dt, consumer) is None
    assert mixer.dt_proj.step_projection(dt, (mixer.out_proj, "input")) is None  # no takes_projection there
    di, n = mixer.d_inner, mixer.d_state
    with pytest.raises(ValueError, match="does not take delta as a DtProjection.*hand it dt_proj's output"):
        mixer.scan.step(torch.zeros(2, di, n), torch.randn(2, di), projection, mixer.A_log, torch.randn(2, n),
                        torch.randn(2, n), mixer.D, torch.randn(2, di))


def test_rotation_in_the_scan_update_only_where_out_proj_takes_rotated_codes():
    """The update makes out_proj's rotated input only in int8 mode, where out_proj takes rotated codes and
    ``emit_rotated`` is on: else y, which out_proj rotates and quantizes itself, as before; a float step asked for a
    rotated output says what to do. The codes it hands over are those of out_proj's own Hadamard + quantize."""
    model = _model(RECIPES / "dual_scale_baseline_mamba1.yaml")
    mixer = model.backbone.layers[0].mixer
    di, n = mixer.d_inner, mixer.d_state
    scan, out_proj = mixer.scan, mixer.out_proj
    assert not scan.rotates_for(out_proj)  # off by default (no faster on an H100: benchmarks/RESULTS.md)
    scan.emit_rotated = True
    torch.manual_seed(3)
    args = (torch.randn(2, di), torch.randn(2, di).abs(), mixer.A_log, torch.randn(2, n), torch.randn(2, n), mixer.D,
            torch.randn(2, di))
    assert scan.rotates_for(out_proj) and not scan.rotates_for(mixer.dt_proj) and not scan.rotates_for(None)
    with torch.no_grad():
        state, state2 = torch.randn(2, di, n), None
        state2 = state.clone()
        codes = scan.step_output_for(out_proj, state, *args)
        y = scan.step(state2, *args)
        assert isinstance(codes, Codes) and torch.equal(state, state2)
        sx = out_proj.q("input").scale_for(y)
        assert torch.equal(codes.q, hadamard_quantize_ref(y, sx, 8)) and torch.equal(codes.scale, sx.reshape(()))
        assert torch.equal(out_proj.step(codes), out_proj.step(y))  # out_proj reads the codes as its own
        counters = scan._rotation_counters(2, di, "cpu")
        assert counters.dtype == torch.int32 and counters.numel() == 2 * (di // (di & -di)) and not counters.any()
        assert scan._rotation_counters(2, di, "cpu") is counters  # one tensor a size: a captured step keeps it live
        assert scan._rotation_counters(1, di, "cpu") is not counters
        assert scan._rotation_counters(2, di, "cpu") is counters
        scan.emit_rotated = False
        assert not scan.rotates_for(out_proj)
        assert isinstance(scan.step_output_for(out_proj, state.clone(), *args), torch.Tensor)
        scan.emit_rotated = True
        set_mode(model, "fakequant")
        assert not scan.rotates_for(out_proj)
        assert isinstance(scan.step_output_for(out_proj, state.clone(), *args), torch.Tensor)
        rotated = RotatedOutput(sx, 8, torch.zeros(2, dtype=torch.int32))
        with pytest.raises(ValueError, match="a rotated output needs int8 mode"):
            scan.step(state.clone(), *args, rotated=rotated)


def test_in_proj_conv_fusion_only_where_both_take_codes():
    """The fused step only where in_proj would emit the conv's codes and the conv its consumers' (int8 mode, both
    ``emit_codes``, ``fuse_in_proj``): else in_proj's step then the conv's, as before; a conv handed a pending GEMV
    it cannot take says what to do."""
    model = _model(RECIPES / "dual_scale_baseline_mamba1.yaml")
    mixer = model.backbone.layers[0].mixer
    di = mixer.d_inner
    hidden = torch.randn(2, mixer.in_proj.in_features)
    in_consumers = ((mixer.conv1d, "input", di), (mixer.scan, "z", di))
    conv_consumers = mixer.conv_consumers()
    assert mixer.conv1d.takes_projected_input(conv_consumers)
    proj = mixer.in_proj.step_gemv_inputs(hidden, in_consumers)
    assert proj is not None and proj.out_columns == [di, di]
    mixer.in_proj.emit_codes = False
    assert mixer.in_proj.step_gemv_inputs(hidden, in_consumers) is None
    mixer.in_proj.emit_codes = True
    for switch in ("emit_codes", "fuse_in_proj"):
        setattr(mixer.conv1d, switch, False)
        assert not mixer.conv1d.takes_projected_input(conv_consumers)
        setattr(mixer.conv1d, switch, True)
    set_mode(model, "fakequant")
    assert not mixer.conv1d.takes_projected_input(conv_consumers)
    assert mixer.in_proj.step_gemv_inputs(hidden, in_consumers) is None
    state = torch.zeros(2, di, mixer.conv1d.kernel_size[0])
    with pytest.raises(ValueError, match="does not take its input as a pending GEMV now"):
        mixer.conv1d.step_from_projection(proj, state, torch.float32, conv_consumers)
