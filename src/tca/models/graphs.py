"""Decode steps captured in a CUDA graph: one replay per token instead of thousands of small launches.

    cache = TCACache(model)                                   # or transformers' StaticCache for dense models
    out = model.generate(ids, custom_generate=tca.models.graph_decoding, max_new_tokens=128,
                         **cache_kwargs(model, cache))

`graph_decoding` is a transformers `custom_generate` callable: `generate` still prepares the inputs, the logits
processors and the stopping criteria; this loop prefills eagerly, captures one single-token forward of the
model (every layer's compress, ring write and attention, on the device, no host synchronisation) and replays it;
tokens are chosen on the device and the host checks for the end only every few tokens (token_loop.py), so the
host prepares the next replay while the device runs the last one.
It needs a cache whose decode step is static: a TCACache (its compressed caches reserve room for the whole
generation first; the default policy only, not tca.Reselect) or a transformers StaticCache (the dense baseline,
captured the same way). Greedy and sampling; no beams.

Shape letters: B batch, V vocabulary.
"""

from __future__ import annotations

import torch

from .cache_argument import cache_argument
from .token_loop import token_loop


class StepGraph:
    """One decode step of `model` (B sequences, one token each) captured in a CUDA graph.

    step(tokens [B, 1], positions [B, 1]) -> logits [B, V]: copies the inputs into the static buffers, replays,
    then lets the caches advance their host bookkeeping (what the replay did on the device).
    """

    def __init__(self, model, cache, tokens: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor):
        self.model, self.cache = model, cache
        self.tokens, self.positions = tokens.clone(), positions.clone()
        self.cache_position = cache_position.clone()
        self.kwargs = {cache_argument(model): cache, "use_cache": True}
        self.graph = torch.cuda.CUDAGraph()
        self.logits = None

    def capture(self) -> torch.Tensor:
        """Warm up once on a side stream (a real step: it advances the caches), then capture a second step
        whose host bookkeeping is rolled back (capturing records kernels, it does not run them)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self._advance_inputs()
        saved = _host_state(self.cache)
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        _restore_host_state(self.cache, saved)
        return logits

    def _forward(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.tokens, position_ids=self.positions, cache_position=self.cache_position, **self.kwargs
        )
        return out.logits[:, -1]

    def _advance_inputs(self) -> None:
        self.positions += 1
        self.cache_position += 1

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Replay one step for tokens [B, 1] (positions follow on from the last step)."""
        self.tokens.copy_(tokens)
        self.graph.replay()
        _advance_host(self.cache)
        self._advance_inputs()
        return self.logits


def _host_state(cache):
    """What the host knows of the cache (TCACache: per layer, lengths and positions), to undo a capture."""
    return [(layer.seen, None if layer.state is None else layer.state.host_state()) for layer in _tca_layers(cache)]


def _restore_host_state(cache, saved) -> None:
    for layer, (seen, state) in zip(_tca_layers(cache), saved, strict=True):
        layer.seen = seen
        if state is not None:
            layer.state.restore_host_state(state)


def _advance_host(cache) -> None:
    for layer in _tca_layers(cache):
        layer.seen += 1
        layer.state.advance_host()


def _tca_layers(cache):
    from .cache import TCACacheLayer

    return [layer for layer in getattr(cache, "layers", []) if isinstance(layer, TCACacheLayer)]


def check_graph_policy(cache) -> None:
    """Refuse, before the prefill, a TCACache whose decode step has no static form: a re-selecting one
    (policy=tca.Reselect with every >= 1) chooses its attended tokens again and grows its evicted store on the
    host side of the step, which a replayed graph would not redo."""
    if any(layer.policy is not None and layer.policy.active for layer in _tca_layers(cache)):
        raise ValueError(
            "graph_decoding does not support a re-selecting cache (TCACache(model, policy=tca.Reselect(...))): its "
            "decode step re-selects on some steps only and grows its evicted store, which one captured step cannot replay; "
            "call generate without "
            "custom_generate, or use TCACache(model) (the default policy)"
        )


def _capturable(state):
    """The cache whose step a graph captures for `state`: itself if it has the capability (GraphCapturable), the
    packed copy of the dense path's cache (one growing buffer: the same tokens, a static step), else None."""
    from tca.backends.common.cache_protocol import GraphCapturable, Packable

    if isinstance(state, GraphCapturable):
        return state
    return state.to_packed() if isinstance(state, Packable) else None


def check_capturable(cache) -> None:
    """Refuse, before anything is captured or changed, a filled TCACache with a layer whose cache has no CUDA-graph
    capability (tca.backends.common.cache_protocol.GraphCapturable): the reference's, a re-selecting one."""
    from tca.backends.common.cache_protocol import GraphCapturable, Packable

    for layer in _tca_layers(cache):
        if layer.state is None:
            raise ValueError("graph decoding needs the cache prefilled first")
        if not isinstance(layer.state, (GraphCapturable, Packable)):
            raise ValueError(
                f"graph_decoding needs a cache whose decode step a CUDA graph can capture (the packed cache of the "
                f"torch, triton or flash backends), but layer {layer.layer_idx} holds a {type(layer.state).__name__}, "
                "which cannot be captured; call generate without custom_generate"
                + (", or use TCACache(model) (the default policy)" if layer.policy is not None else "")
            )


def prepare_static(cache, new_tokens: int) -> None:
    """Reserve room for `new_tokens` more steps in every compressed layer and switch it to static shapes. The
    dense path's cache (one growing buffer) becomes the same tokens in the packed cache, whose step is static.
    A cache without the capability (the reference's, a re-selecting one) is refused before a layer changes."""
    check_capturable(cache)
    for layer in _tca_layers(cache):
        capturable = _capturable(layer.state)
        if capturable is not layer.state:
            layer.state = capturable
        layer.state.prepare_capture(new_tokens + 2)  # + the warm-up step and one spare


def graph_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
):
    """A transformers `custom_generate` callable: eager prefill, then decode steps replayed from a CUDA graph.

    Returns the sequences [B, prompt + new] like greedy/sampling `generate` (no dict outputs)."""
    if generation_config.num_beams and generation_config.num_beams > 1:
        raise ValueError("graph_decoding does not support beam search (num_beams > 1)")
    name = cache_argument(model)
    cache = model_kwargs.get(name) or model_kwargs.get("past_key_values") or model_kwargs.get("cache")
    if cache is None:
        raise ValueError(f"graph_decoding needs a cache passed to generate ({name}=TCACache(model) or a StaticCache)")
    if _tca_layers(cache) and len(_tca_layers(cache)) != len(cache.layers):
        # A hybrid model's sliding-window layers grow by concatenation and get a new mask every step, which a
        # replayed graph would not redo.
        raise ValueError("graph_decoding does not support hybrid models (sliding-window layers); call generate "
                         "without custom_generate")
    check_graph_policy(cache)
    if cache.get_seq_length() > 0:
        raise ValueError("graph_decoding needs an empty cache (it prefills the whole prompt): pass a new one, or call "
                         "cache.reset() first")
    if input_ids.device.type != "cuda":
        raise ValueError("graph_decoding needs a CUDA device (CUDA graphs); call generate without custom_generate")
    mask = model_kwargs.get("attention_mask")
    B, L = input_ids.shape
    if mask is None:
        mask = torch.ones_like(input_ids)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    max_new = generation_config.max_new_tokens or (generation_config.max_length - L)
    graph = None

    def next_logits(step: int, token: torch.Tensor) -> torch.Tensor:
        nonlocal graph
        if graph is None:  # the first decode step captures the graph (its warm-up run is that step)
            prepare_static(cache, max_new)
            cache_position = torch.tensor([L + step], device=input_ids.device)
            graph = StepGraph(model, cache, token, positions[:, -1:] + 1, cache_position)
            return graph.capture().float()
        return graph.step(token).float()

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{name: cache})
        sequences = token_loop(out.logits[:, -1].float(), next_logits, input_ids, max_new, logits_processor,
                               stopping_criteria, generation_config, streamer)
    if streamer is not None:
        streamer.end()
    return sequences
