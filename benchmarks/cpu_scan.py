"""CPU speed of the pure-torch Mamba1 model: forward + backward with our chunked selective scan vs the plain
Python loop over time (mamba_ssm's selective_scan_ref style), same model, same weights, same batch, one run.

    python benchmarks/cpu_scan.py [--d-model 512 --n-layer 9 --batch 4 --seq-len 256 --repeats 3]

Prints both times, the speed-up and the max difference of the two losses and gradients.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from qmamba import MambaConfig, MambaLM
from qmamba.models import parts
from qmamba.ops import selective_scan_loop_ref


def step(model: MambaLM, ids: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    seconds = time.perf_counter() - t0
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return seconds, loss.item(), grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--n-layer", type=int, default=9)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-repeats", type=int, default=1)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=256)
    model = MambaLM(cfg)
    parts.set_backend(model, "torch")
    ids = torch.randint(0, 256, (args.batch, args.seq_len + 1))
    print(f"Mamba1 d_model={args.d_model} n_layer={args.n_layer}: {model.num_parameters() / 1e6:.1f}M parameters, "
          f"batch {args.batch} x {args.seq_len}, {torch.get_num_threads()} threads")

    step(model, ids)  # warm-up
    ours = [step(model, ids) for _ in range(args.repeats)]
    t_ours = min(r[0] for r in ours)
    print(f"chunked scan: {t_ours:.2f} s per forward+backward (best of {args.repeats})")

    def loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  return_last_state=False, backend="auto"):
        return selective_scan_loop_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                       delta_softplus=delta_softplus, return_last_state=return_last_state)

    with mock.patch.object(parts.ops, "selective_scan", loop_scan):
        loop = [step(model, ids) for _ in range(args.loop_repeats)]
    t_loop = min(r[0] for r in loop)
    print(f"loop over time: {t_loop:.2f} s per forward+backward (best of {args.loop_repeats})")
    print(f"speed-up: {t_loop / t_ours:.1f}x; |loss diff| {abs(ours[0][1] - loop[0][1]):.2e}; "
          f"max |grad diff| {(ours[0][2] - loop[0][2]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
