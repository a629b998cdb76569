"""Inference latency: qmamba int8 against mamba_ssm fp16, in one run on one GPU, random weights, batch 1.

    python benchmarks/latency.py [--configs mamba-130m mamba-2.8b mamba2-2.7b] [--prompt 1024] [--json out.json]

For each config and each engine:
- TTFT, time to first token: prefill of ``--prompt`` tokens (filling the decode cache) + the greedy pick of the first
  token, median of ``--reps`` runs;
- TPOT, time per output token: ONE decode step (one token in, logits out, cache updated in place) captured in a CUDA
  graph by this file's harness (the same for both engines) and replayed, median over ``--reps`` batches of
  ``--replays`` replays;
- peak memory over prefill + decode, and the bytes of the weights;
- the weight-read floor of a decode step (weight bytes / the GPU's measured copy bandwidth), and how close TPOT gets.

qmamba's model is built at the config with random weights, prepared with the config's preset recipe (quamba_w8a8 /
quamba2_w8a8), calibrated on one random batch, converted to int8 weights and run in int8 mode (kernels from
``qmamba.kernels``); its float leftovers (embedding / tied lm_head, norm weights) are fp16 as in the baseline.
mamba_ssm's ``MambaLMHeadModel`` runs in fp16 with its own inference cache (causal-conv1d's kernels when installed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmamba import MambaLM, preset  # noqa: E402
from qmamba.kernels.launch import launch_overlap  # noqa: E402


def cuda_time_ms(fn, reps: int, inner: int = 1) -> float:
    """Median over ``reps`` of the CUDA-event time of ``inner`` calls of ``fn``, per call."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def capture(fn) -> torch.cuda.CUDAGraph:
    """``fn`` (one decode step on static buffers) captured in a CUDA graph, after warm-up on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted), the decode floor's yardstick."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() / (ms * 1e-3)


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---- engines: each returns (prefill(ids) -> first token, step() on static buffers, module) ----------------------------
def mamba_ssm_engine(cfg, prompt_len: int):
    from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.utils.generation import InferenceParams

    model = MambaLMHeadModel(SsmConfig(**cfg.to_mamba_ssm()), device="cuda", dtype=torch.float16).eval()
    params = InferenceParams(max_seqlen=prompt_len + 16, max_batch_size=1)
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")

    def prefill(ids):
        params.seqlen_offset = 0
        params.key_value_memory_dict = model.allocate_inference_cache(1, prompt_len + 16, dtype=torch.float16)
        logits = model(ids, inference_params=params).logits
        params.seqlen_offset = ids.shape[1]  # > 0: the next call takes mamba_ssm's one-token step path
        return logits[:, -1].argmax(-1)

    def step():
        return model(token, inference_params=params).logits

    return prefill, step, model


def qmamba_int8_unfused_engine(cfg, prompt_len: int):
    """``qmamba_int8_engine`` with every hand-off of codes between parts off (``emit_codes`` / ``float_inputs``):
    each part quantizes its float input itself, one kernel each; side by side with the default, what the hand-offs
    bring."""
    return qmamba_int8_engine(cfg, prompt_len, hand_offs=False)


def qmamba_int8_rotated_engine(cfg, prompt_len: int):
    """``qmamba_int8_engine`` with Mamba1's scan update rotating out_proj's input itself (``emit_rotated`` on: no
    Hadamard + quantize kernel after it, one kernel fewer a layer); side by side with the default, what that fusion
    brings."""
    return qmamba_int8_engine(cfg, prompt_len, rotated=True)


def qmamba_int8_engine(cfg, prompt_len: int, hand_offs: bool = True, rotated: bool = False):
    from qmamba.generation import InferenceCache
    from qmamba.qnn import calibrate, convert, prepare, set_mode

    recipe = "quamba2_w8a8" if cfg.layer == "Mamba2" else "quamba_w8a8"
    model = MambaLM(cfg).cuda().eval()
    prepare(model, recipe)
    with torch.no_grad():
        calibrate(model, [torch.randint(0, cfg.vocab_size, (1, 256), device="cuda")], progress=False)
    convert(model)
    set_mode(model, "int8")
    fp16_float_leftovers_(model)
    flags = {"emit_codes": hand_offs, "float_inputs": hand_offs, "emit_rotated": hand_offs and rotated}
    for module in model.modules():
        for flag, on in flags.items():
            if hasattr(module, flag):
                setattr(module, flag, on)
    cache = InferenceCache.allocate(model, batch=1, device="cuda", dtype=torch.float16)
    token = torch.zeros(1, dtype=torch.long, device="cuda")

    def prefill(ids):
        logits = model.prefill(ids, cache)
        return logits[:, -1].argmax(-1)

    def step():
        return model.step(token, cache)

    return prefill, step, model


def fp16_float_leftovers_(model: MambaLM) -> None:
    """The embedding (tied lm_head) and norm weights in fp16, as mamba_ssm's fp16 model has them; A_log, D, dt_bias,
    biases and scales stay fp32 (the kernels read them as fp32)."""
    model.backbone.embedding.half()
    if model.lm_head.weight is not model.backbone.embedding.weight:
        model.lm_head.half()
    for name, module in model.named_modules():
        if name.endswith("norm") or name.endswith("norm_f"):
            module.half()


ENGINES = {"mamba_ssm fp16": mamba_ssm_engine, "qmamba int8": qmamba_int8_engine,
           "qmamba int8 unfused": qmamba_int8_unfused_engine, "qmamba int8 serial": qmamba_int8_engine,
           "qmamba int8 rotated": qmamba_int8_rotated_engine}
# engines measured with qmamba's kernels launched one after the other (qmamba.kernels.launch): beside the default
# (overlapped, programmatic dependent launch), what the overlap brings
SERIAL_ENGINES = {"qmamba int8 serial"}
DEFAULT_ENGINES = ["mamba_ssm fp16", "qmamba int8"]


def cfg_name(cfg) -> str:
    return f"{cfg.layer} d_model {cfg.d_model} x {cfg.n_layer}"


def print_profile(fn, title: str, rows: int) -> None:
    """The ``rows`` costliest ops of one (warmed-up) call of ``fn`` by GPU time, from torch.profiler, then its ``rows``
    costliest Python functions by own host time (cProfile, one more call): where the
    time goes before any kernel is changed."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"--- profile: {title}", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60), flush=True)
    # the host side of one more call: when the CPU time above exceeds the GPU time, the Python frames that spend it
    import cProfile
    import io
    import pstats

    host = cProfile.Profile()
    host.runcall(fn)
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(rows)
    print(f"--- host profile (cProfile, by own time): {title}", flush=True)
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-6000:], flush=True)


def host_syncs(fn) -> list[str]:
    """Where one (warmed-up) call of ``fn`` makes the host wait for the GPU: torch's CUDA sync debug mode warns at
    each synchronizing call (a value read on the host, a blocking copy, a stream sync); returns "file:line: message"
    of each, the Python frame that made it. A prefill that syncs cannot overlap its host work with its kernels."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught
            if "synchroniz" in str(w.message).lower()]


def measure(engine, cfg, args, bandwidth: float) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        prefill, step, model = engine(cfg, args.prompt)
        weights = weight_bytes(model)
        ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            prefill(ids)
        one_prefill = functools.partial(prefill, ids)
        ttft = cuda_time_ms(one_prefill, reps=args.reps)
        if args.sync_check:
            syncs = host_syncs(one_prefill)
            print(f"{cfg_name(cfg)} / {engine.__name__}: one prefill makes {len(syncs)} host syncs", flush=True)
            for where, n in collections.Counter(syncs).most_common(8):
                print(f"    {n:4d}  {where}", flush=True)
        if args.profile:
            print_profile(one_prefill, f"{cfg_name(cfg)} / {engine.__name__}: one prefill", args.profile)
        if args.profile_decode:
            steps = lambda: [step() for _ in range(10)]  # noqa: E731
            print_profile(steps, f"{cfg_name(cfg)} / {engine.__name__}: 10 decode steps, not graphed (Calls / 10 = "
                          "launches a step)", args.profile_decode)
        graph = capture(step)
        tpot = cuda_time_ms(graph.replay, reps=args.reps, inner=args.replays)
    peak = torch.cuda.max_memory_allocated() - base
    floor_ms = weights / bandwidth * 1e3
    del graph, model, prefill, one_prefill, step
    return {"ttft_ms": ttft, "tpot_ms": tpot, "peak_mib": peak / 2**20, "weight_mib": weights / 2**20,
            "floor_ms": floor_ms, "tpot_over_floor": tpot / floor_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["mamba-130m", "mamba-2.8b", "mamba2-2.7b"])
    ap.add_argument("--engines", nargs="+", default=DEFAULT_ENGINES, choices=list(ENGINES),
                    help="'qmamba int8 unfused': the int8 model with no codes handed between parts; 'qmamba int8 "
                    "serial': with qmamba's kernels launched one after the other, not overlapped (ablations)")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens for TTFT")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--replays", type=int, default=50, help="graph replays per timed batch (TPOT)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile-decode", type=int, default=0, metavar="ROWS",
                    help="also print torch.profiler's ROWS costliest ops of 10 decode steps per engine (not timed)")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="also print torch.profiler's ROWS costliest ops of one prefill per engine (not timed)")
    ap.add_argument("--sync-check", action="store_true",
                    help="also count the host syncs of one prefill per engine (torch's CUDA sync debug mode)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/latency.py needs a CUDA GPU")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy bandwidth {bandwidth / 1e12:.2f} TB/s; prompt {args.prompt} tokens, batch 1", flush=True)
    rows = []
    for name in args.configs:
        cfg = preset(name)
        results = {}
        for engine in args.engines:
            try:
                with launch_overlap(False) if engine in SERIAL_ENGINES else contextlib.nullcontext():
                    results[engine] = measure(ENGINES[engine], cfg, args, bandwidth)
            except Exception as err:  # one engine failing must not hide the other's figures
                print(f"{name} / {engine}: FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            r = results[engine]
            print(f"{name:12s} {engine:15s} TTFT {r['ttft_ms']:8.2f} ms  TPOT {r['tpot_ms']:7.3f} ms "
                  f"(floor {r['floor_ms']:.3f} ms, {r['tpot_over_floor']:.2f}x)  peak {r['peak_mib']:8.0f} MiB  "
                  f"weights {r['weight_mib']:8.0f} MiB", flush=True)
            rows.append({"config": name, "engine": engine, **r})
        base = results.get("mamba_ssm fp16")
        for engine in ("qmamba int8", "qmamba int8 unfused", "qmamba int8 serial", "qmamba int8 rotated"):
            if base is not None and engine in results:
                ours = results[engine]
                print(f"{name:12s} speedup {engine[7:]} vs fp16: TTFT {base['ttft_ms'] / ours['ttft_ms']:.2f}x, "
                      f"TPOT {base['tpot_ms'] / ours['tpot_ms']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "bandwidth": bandwidth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
