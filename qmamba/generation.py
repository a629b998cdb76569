"""Fast generation: prefill the prompt once, then one recurrent ``step`` per new token, on a static cache, with the
step captured in a CUDA graph on a GPU.

    ids = generate(model, prompt_ids, max_new_tokens=200, temperature=0.8, top_k=50)   # (B, L) -> (B, L + new)

Every mode of a quantized model works (fp, fakequant, int8: whatever ``set_mode`` put it in); ``MambaLM.prefill`` and
``MambaLM.step`` give the logits ``forward`` gives on the same tokens (tests/test_generation.py measures how close).

For timing (benchmarks/latency.py), ``DecodeGraph`` exposes the pieces: ``prefill`` (time to first token = prefill +
the first sample) and ``replay`` (time per output token = one replay of the captured step).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from qmamba.models.lm import InferenceCache, MambaLM

__all__ = ["DecodeGraph", "InferenceCache", "generate", "sample"]


def sample(logits: torch.Tensor, vocab_size: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V) over the first ``vocab_size`` columns (never a padding column).
    ``temperature`` 0: greedy (argmax). Otherwise softmax(logits / temperature), cut to the ``top_k`` most likely
    tokens and to the smallest set whose probability reaches ``top_p`` (nucleus), sampled with ``generator``."""
    logits = logits[:, :vocab_size].float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, vocab_size), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the tokens before this one already hold top_p
        drop[:, 0] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(-1)


class DecodeGraph:
    """Decoding ``model`` (in its current mode) on a static cache and a static token buffer:

        decoder = DecodeGraph(model, batch_size)   # allocates the cache
        decoder.capture()                          # CUDA only: warm up on a side stream, capture one model.step
        logits = decoder.prefill(prompt_ids)       # (B, V) at the prompt's last token; fills the cache
        logits = decoder.step(next_ids)            # (B, V): a replay of the captured step (eager if not captured)

    ``step`` / ``replay`` return the graph's static output buffer, which the next replay overwrites: sample from it
    first. ``capture`` may come before or after a prefill (it leaves the cache as it found it); after ``set_mode``
    or a weight change, make a new DecodeGraph.
    """

    def __init__(self, model: MambaLM, batch_size: int, device=None, dtype: torch.dtype | None = None):
        self.model = model
        self.cache = model.allocate_cache(batch_size, device, dtype)
        self.device = self.cache.layers[0].ssm_state.device
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the captured step's output (B, V)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, V)
        return self.model.prefill(input_ids, self.cache, last_only=True)[:, -1]

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> DecodeGraph:
        """Capture one ``model.step`` on the static buffers into a CUDA graph. The warm-up steps (on a side stream,
        as CUDA graphs require: lazy initialization, Triton autotuning) run on the cache, which is restored after."""
        if self.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device, this one is on {self.device}; decode "
                             "eagerly (cuda_graph=False) instead")
        saved = [t.clone() for t in self.cache.tensors()]
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.model.step(self.tokens, self.cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.model.step(self.tokens, self.cache)
            for t, s in zip(self.cache.tensors(), saved):
                t.copy_(s)
        self.graph = graph
        return self

    def replay(self, input_ids: torch.Tensor | None = None) -> torch.Tensor:  # (B,) -> (B, V)
        """One captured step on ``input_ids`` (or on what the token buffer holds); returns the static logits."""
        if self.graph is None:
            raise RuntimeError("nothing captured yet: call DecodeGraph.capture() first")
        if input_ids is not None:
            self.tokens.copy_(input_ids.reshape(-1))
        self.graph.replay()
        return self.logits

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, V)
        return self.replay(input_ids) if self.graph is not None else self.model.step(input_ids, self.cache)


def _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id) -> None:
    if not isinstance(model, MambaLM):
        raise TypeError(f"generate needs a qmamba MambaLM, got {type(model).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be integer token ids of shape (batch, L) with L >= 1, got "
                         f"{input_ids.dtype} {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None: no cut), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None: no cut), got {top_p}")
    if eos_id is not None and not 0 <= eos_id < model.config.vocab_size:
        raise ValueError(f"eos_id {eos_id} is not a token of this model (vocab size {model.config.vocab_size})")


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def generate(model: MambaLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             cuda_graph: bool | None = None, eos_id: int | None = None,
             timings: dict | None = None) -> torch.Tensor:
    """Append up to ``max_new_tokens`` tokens to ``input_ids`` (B, L): prefill the prompt once, then one
    ``model.step`` per token. Returns (B, L + n), n = max_new_tokens unless every row has emitted ``eos_id`` (rows
    that have are padded with it).

    Sampling: see ``sample`` (``temperature`` 0 is greedy; ``generator`` makes sampling reproducible).
    ``cuda_graph``: None (default) captures the step in a CUDA graph on a GPU and decodes eagerly elsewhere; True
    asks for the graph (an error off CUDA); False decodes eagerly. Graph and eager decoding compute the same ops.
    ``timings``: if a dict, it receives ``prefill_s`` (prefill + first sample), ``decode_s`` (the other tokens),
    ``capture_s`` and ``new_tokens`` (synchronizing the GPU to measure).
    """
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id)
    if cuda_graph and not input_ids.is_cuda:
        raise ValueError(f"cuda_graph=True needs the model and input_ids on a CUDA device (they are on "
                         f"{input_ids.device}); pass cuda_graph=False or None (graphs on a GPU, eager elsewhere)")
    if max_new_tokens == 0:
        return input_ids
    device, vocab = input_ids.device, model.config.vocab_size
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,); rows past their eos repeat it
        nxt = sample(logits, vocab, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, eos_id)
            finished.logical_or_(nxt == eos_id)
        return nxt

    def done() -> bool:
        return len(new) == max_new_tokens or (eos_id is not None and bool(finished.all()))

    t0 = _sync(device) if timings is not None else 0.0
    decoder = DecodeGraph(model, input_ids.shape[0], device=device)
    new = [pick(decoder.prefill(input_ids))]
    t1 = _sync(device) if timings is not None else 0.0
    if (input_ids.is_cuda if cuda_graph is None else cuda_graph) and not done():
        decoder.capture()  # after the prefill: its forward checks that the model is calibrated, the step cannot
    t2 = _sync(device) if timings is not None else 0.0
    while not done():
        new.append(pick(decoder.step(new[-1])))
    if timings is not None:
        timings.update(prefill_s=t1 - t0, capture_s=t2 - t1, decode_s=_sync(device) - t2, new_tokens=len(new))
    return torch.cat([input_ids, torch.stack(new, 1).to(input_ids.dtype)], dim=1)
