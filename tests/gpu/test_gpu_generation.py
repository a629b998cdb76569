"""On a CUDA GPU: decoding with the step captured in a CUDA graph equals eager decoding token for token, the graph
survives new prefills (the cache is static), and prefill + step give forward's logits — small Mamba1 / Mamba2 models
(d_model 128, 2 layers) in fp32, bf16, fakequant and int8 (calibrated, and converted to int8 weights).

Tolerances:
- CUDA graph vs eager: identical greedy tokens; logits within relative L2 1e-5 (the graph replays the same kernels,
  in practice bit-identical, but cuBLAS may pick another algorithm on the capture stream).
- prefill + step vs forward with the parts on the torch backend: fp32 relative L2 <= 1e-4 (TF32 off; only the order
  of fp32 sums differs), fakequant / int8 <= 5e-3 (a code at a rounding boundary may flip by 1 LSB, DESIGN §3: one
  flip moved these logits by 2e-3 on CPU; quantization itself moves them by ~3e-2).
- the same on the "auto" backend (forward / prefill through mamba_ssm's kernels where installed, the step in torch):
  relative L2 <= 2e-2, because mamba_ssm's SSD Triton kernel computes fp32 dot products in TF32 (~2e-3 from the fp32
  loop, see test_gpu_mamba_ssm.py; a fakequant Mamba2 measured 1.01e-2 on an H200 when TF32 shifts put a code across a
  rounding boundary); a cache filled wrong is off by O(1).
- bf16: graph vs eager tokens only (bf16 rounding makes the forward comparison loose).
Batch 20 on the int8 model takes qmamba's Triton W8A8 GEMM (M > 8) inside the graph; batch 3 the CUDA GEMV.
"""

import pytest
import torch

from qmamba import MambaLM, preset, set_backend
from qmamba.generation import DecodeGraph, generate
from qmamba.qnn import calibrate, convert, prepare, set_mode

pytestmark = pytest.mark.gpu

GRAPH_REL = 1e-5
FP32_REL = 1e-4
QUANT_REL = 5e-3
KERNEL_REL = 2e-2
RECIPES = {"tiny": "quamba_w8a8", "tiny-mamba2": "quamba2_w8a8"}


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _ids(batch, L, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, 256, (batch, L), device="cuda", generator=g)


def _model(name: str, kind: str) -> MambaLM:
    """kind: fp32 | bf16 | fakequant | int8 (prepared, calibrated) | converted (int8 weights)."""
    torch.manual_seed(0)
    model = MambaLM(preset(name, d_model=128, n_layer=2)).cuda().eval()
    if kind == "bf16":
        return model.to(torch.bfloat16)
    if kind == "fp32":
        return model
    prepare(model, RECIPES[name])
    with torch.no_grad():
        calibrate(model, [_ids(4, 128, 1), _ids(4, 128, 2)], progress=False)
    return convert(model) if kind == "converted" else set_mode(model, kind)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind, batch", [("fp32", 3), ("bf16", 3), ("fakequant", 3), ("int8", 3), ("converted", 3),
                                         ("converted", 20)])
@pytest.mark.parametrize("name", ["tiny", "tiny-mamba2"])
def test_cuda_graph_decode_equals_eager(name, kind, batch):
    model = _model(name, kind)
    prompt = _ids(batch, 12, 3)
    graph = generate(model, prompt, 24, cuda_graph=True)
    eager = generate(model, prompt, 24, cuda_graph=False)
    assert graph.shape == (batch, 36)
    assert torch.equal(graph, eager)
    assert torch.equal(generate(model, prompt, 24), graph)  # cuda_graph=None on a GPU: the graph
    # the logits of every step, fed the same tokens
    graphed, stepped = DecodeGraph(model, batch).capture(), DecodeGraph(model, batch)
    a, b = graphed.prefill(prompt), stepped.prefill(prompt)
    assert _rel(a, b) <= GRAPH_REL
    for t in range(12, 36):
        a, b = graphed.step(graph[:, t]), stepped.step(graph[:, t])
        assert _rel(a, b) <= GRAPH_REL, t


def test_cuda_graph_sampling_equals_eager():
    model = _model("tiny", "fp32")
    prompt = _ids(4, 8, 4)

    def run(cuda_graph):
        gen = torch.Generator(device="cuda").manual_seed(5)
        return generate(model, prompt, 20, temperature=1.0, top_k=40, top_p=0.9, generator=gen,
                        cuda_graph=cuda_graph)

    assert torch.equal(run(True), run(False))


@pytest.mark.parametrize("name", ["tiny", "tiny-mamba2"])
def test_graph_survives_new_prefills_and_capture_leaves_the_cache(name):
    model = _model(name, "converted")
    decoder, eager = DecodeGraph(model, 2), DecodeGraph(model, 2)
    first, second = _ids(2, 9, 6), _ids(2, 17, 7)
    decoder.prefill(first)
    before = [t.clone() for t in decoder.cache.tensors()]
    decoder.capture()
    assert all(torch.equal(a, b) for a, b in zip(decoder.cache.tensors(), before))
    for prompt in (first, second):  # the second prefill rewrites the cache the graph reads, in place
        if prompt is second:
            decoder.prefill(prompt)
        eager.prefill(prompt)
        tokens = _ids(2, 6, 8)
        for t in range(6):
            assert _rel(decoder.step(tokens[:, t]), eager.step(tokens[:, t])) <= GRAPH_REL


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("kind", ["fp32", "fakequant", "int8", "converted"])
@pytest.mark.parametrize("name", ["tiny", "tiny-mamba2"])
def test_prefill_then_step_matches_forward(name, kind, backend):
    model = set_backend(_model(name, kind), backend)
    ids = _ids(2, 48, 9)
    with torch.no_grad():
        ref = model(ids).float()
        for P in (2, 33):
            cache = model.allocate_cache(2)
            pre = model.prefill(ids[:, :P], cache).float()
            steps = torch.stack([model.step(ids[:, t], cache) for t in range(P, 48)], 1).float()
            tol = KERNEL_REL if backend == "auto" else FP32_REL if kind == "fp32" else QUANT_REL
            assert _rel(pre, ref[:, :P]) <= tol and _rel(steps, ref[:, P:]) <= tol, P
