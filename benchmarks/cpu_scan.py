"""CPU speed of the pure-torch Mamba1 model: forward + backward with our chunked selective scan against two Python
loops over time, same model, same weights, same batch, in one run:

- "naive loop": the pattern of the research reference code (mamba_ssm's ``selective_scan_ref``): build the full
  (b, d, L, n) decay and input tensors, then index them step by step under autograd — whose backward scatters every
  step's gradient into a full-size zero tensor, O(L^2) memory traffic;
- "lean loop": our ``selective_scan_loop_ref``, a step loop that only indexes the small (b, d, L) inputs.

    python benchmarks/cpu_scan.py [--d-model 512 --n-layer 9 --batch 4 --seq-len 256 --repeats 3]

Prints the times, the speed-ups and the max difference of the losses and gradients.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from qmamba import MambaConfig, MambaLM
from qmamba.models import parts
from qmamba.ops import selective_scan_loop_ref


def naive_loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False, backend="auto"):
    """The research-code reference pattern (3-D B / C only), written out for this benchmark."""
    delta = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0)
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    u = u.float()
    decay = torch.exp(delta.unsqueeze(-1) * A.float()[:, None, :])  # (b, d, L, n)
    inputs = (delta * u).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(1)  # (b, d, L, n)
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        state = decay[:, :, t] * state + inputs[:, :, t]
        ys.append((state * C[:, None, :, t].float()).sum(-1))
    y = torch.stack(ys, dim=-1) + u * D.float()[:, None]
    return y * torch.nn.functional.silu(z.float())


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

    def lean_loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, backend="auto"):
        return selective_scan_loop_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                       delta_softplus=delta_softplus, return_last_state=return_last_state)

    for name, fn, repeats in (("lean loop", lean_loop_scan, args.repeats),
                              ("naive loop", naive_loop_scan, args.loop_repeats)):
        with mock.patch.object(parts.ops, "selective_scan", fn):
            runs = [step(model, ids) for _ in range(repeats)]
        t = min(r[0] for r in runs)
        print(f"{name}: {t:.2f} s per forward+backward (best of {repeats}); ours is {t / t_ours:.1f}x faster; "
              f"|loss diff| {abs(ours[0][1] - runs[0][1]):.2e}; "
              f"max |grad diff| {(ours[0][2] - runs[0][2]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
