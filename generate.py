"""Generate text from a checkpoint: `python generate.py --checkpoint runs/ptq/int8.ckpt --prompt "ROMEO." --mode int8`.

Loads the checkpoint as evaluate.py does (a qmamba .ckpt: fp, prepared or int8; a mamba_ssm / Hugging Face model
folder; a hub id), tokenizes the prompt with the checkpoint's tokenizer (bytes unless its datamodule said otherwise),
prefills it once and decodes one recurrent step per token (captured in a CUDA graph on a GPU). Prints the text of each
sequence, then the decode speed in new tokens per second.
"""

from __future__ import annotations

import argparse
import sys

from qmamba.lightning.cli import run_with_clear_errors


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="a qmamba .ckpt (fp, prepared or int8), a mamba_ssm / Hugging Face model folder, or a hub id")
    ap.add_argument("--prompt", required=True, help="the text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    ap.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--mode", help="int8 | fp | fakequant (aliases 0 | 1 | 2); default: int8 for an int8 checkpoint, "
                                   "fp otherwise")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when a GPU is visible")
    ap.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on a GPU (no CUDA graph)")
    ap.add_argument("--batch", type=int, default=1, help="number of sequences sampled from the prompt at once")
    ap.add_argument("--eos-id", type=int, help="stop a sequence at this token")
    ap.add_argument("--tokenizer", help="override the checkpoint's tokenizer (bytes, or a transformers name)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda"])
    return ap.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if not args.prompt:
        raise ValueError("--prompt is empty: the model needs at least one token to continue")


def main(argv=None) -> None:
    args = parse_args(argv)
    _check(args)
    import torch

    from qmamba.data.tokenizers import get_tokenizer
    from qmamba.evaluation import check_backend, data_config_of, supported_modes
    from qmamba.generation import generate
    from qmamba.lightning.module import LMModule
    from qmamba.modes import parse_mode
    from qmamba.qnn import is_converted, set_mode

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    check_backend(args.backend)
    module = LMModule(init_from=str(args.checkpoint), backend=args.backend, sample_tokens=0)
    model = module.model
    mode = parse_mode(args.mode) if args.mode is not None else ("int8" if is_converted(model) else "fp")
    supported = supported_modes(module)
    if mode not in supported:
        raise ValueError(f"--mode {mode}: {args.checkpoint} runs in {', '.join(supported)} only"
                         + ("; int8 / fakequant need a calibrated (prepared) or int8 checkpoint, e.g. from "
                            "`python train.py --config configs/ptq.yaml`" if supported == ("fp",) else ""))
    set_mode(model, mode)
    model.to(device).eval()

    tokenizer = get_tokenizer(args.tokenizer or data_config_of(str(args.checkpoint)).get("tokenizer", "bytes"))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}; pass the checkpoint's tokenizer with --tokenizer")
    prompt = tokenizer.encode_to_tensor(args.prompt).to(device)
    if prompt.numel() == 0:
        raise ValueError("--prompt encodes to no tokens: give some text")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    timings: dict = {}
    out = generate(model, prompt.unsqueeze(0).repeat(args.batch, 1), args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                   cuda_graph=False if args.no_cuda_graph else None, eos_id=args.eos_id, timings=timings)
    for i, row in enumerate(out.tolist()):
        if args.batch > 1:
            print(f"--- sequence {i} ---")
        print(tokenizer.decode(row))
    new, decode_s = timings["new_tokens"], timings["decode_s"]
    rate = args.batch * (new - 1) / decode_s if new > 1 and decode_s > 0 else float("nan")
    graph = "CUDA graph" if device.type == "cuda" and not args.no_cuda_graph and new > 1 else "eager"
    print(f"[{new} new tokens x {args.batch} sequence(s): {rate:.1f} tokens/s decoding ({graph}, {mode}, {device}); "
          f"prefill of {prompt.numel()} tokens + first token {1000 * timings['prefill_s']:.1f} ms]", file=sys.stderr)


if __name__ == "__main__":
    run_with_clear_errors(main)
