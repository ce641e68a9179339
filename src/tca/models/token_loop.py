"""The token loop of a custom `generate`: choose each token on the device, ask the host only now and then.

`generate`'s own loop asks "has every sequence stopped?" after every token. That question reads a flag from the
device, so the host waits for the step to finish before it may queue the next one, and everything the host does
between two steps (logits processors, sampling, stopping criteria, the caches' host bookkeeping) adds to the
step's time. This loop writes the tokens into a preallocated buffer and asks only every `CHECK_EVERY` tokens;
in between, the host queues the next steps while the device still runs the previous ones. Steps past the point
where every sequence stopped are trimmed, so the result is what `generate` returns.

What still waits for the device, every token: a streamer (each token goes to the host; with one, the loop also
checks every token), and logits processors or stopping criteria that read tensors on the host: in transformers,
`NoRepeatNGramLogitsProcessor` and `EncoderNoRepeatNGramLogitsProcessor` (`.tolist()`), `WatermarkLogitsProcessor`
and `WhisperTimeStampLogitsProcessor` (`.item()`, `.tolist()`), `PrefixConstrainedLogitsProcessor` (the user's
function gets token ids) and `ConfidenceCriteria` (`.item()`). The usual ones (temperature, top-k, top-p, min-p,
repetition penalty, min length, suppressing tokens, EOS, max length, stop strings) stay on the device.

Shape letters: B batch, L prompt tokens, N new tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHECK_EVERY = 16  # tokens between two host checks: at most 15 wasted steps once all stop, one wait per 16 tokens


def token_loop(
    logits: torch.Tensor,
    next_logits: Callable[[int, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    max_new: int,
    logits_processor,
    stopping_criteria,
    generation_config,
    streamer=None,
) -> torch.Tensor:
    """Greedy or sampled tokens, as `generate` chooses them.

    logits [B, V]: the prefill's last position; next_logits(step, token [B, 1]) -> logits [B, V] runs the model on
    the token chosen at `step` (0-based). Returns sequences [B, L + n], n <= max_new: the prompt, then the tokens
    up to the step at which every sequence had stopped (the pad token after a sequence stops)."""
    B, L = input_ids.shape
    device = input_ids.device
    pad_id = generation_config._pad_token_tensor
    check_every = 1 if streamer is not None else CHECK_EVERY
    sequences = input_ids.new_zeros(B, L + max_new)
    sequences[:, :L] = input_ids
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    alive = torch.ones(max_new, dtype=torch.bool, device=device)  # alive[s]: a sequence runs on after step s
    steps = 0
    for step in range(max_new):
        scores = logits_processor(sequences[:, : L + step], logits)
        if generation_config.do_sample:
            token = torch.multinomial(scores.softmax(-1), 1)
        else:
            token = scores.argmax(-1, keepdim=True)
        if pad_id is not None:
            token = torch.where(unfinished[:, None], token, pad_id)
        sequences[:, L + step] = token[:, 0]
        if streamer is not None:
            streamer.put(token.cpu())
        unfinished &= ~stopping_criteria(sequences[:, : L + step + 1], scores)
        alive[step] = unfinished.any()
        steps = step + 1
        if steps == max_new or (steps % check_every == 0 and not bool(alive[step])):
            break
        logits = next_logits(step, token)
    stopped = (~alive[:steps]).nonzero()  # the one read of the device that every generation makes
    kept = int(stopped[0]) + 1 if len(stopped) else steps
    return sequences[:, : L + kept]
