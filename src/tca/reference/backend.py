"""The oracle packaged as a backend implementation (registered by tca.backends.reference, loaded on first use)."""

from . import attend, attention, decode_step, prefill, select
from .chunked import empty_cache, exact_chunk, exact_finish, streaming_chunk


class ReferenceBackend:
    attention = staticmethod(attention)
    select = staticmethod(select)
    attend = staticmethod(attend)
    prefill = staticmethod(prefill)
    decode = staticmethod(decode_step)
    # Chunked prefill (section 5b): exact chunks over a dense state, streaming chunks over the cache.
    exact_chunk = staticmethod(exact_chunk)
    exact_finish = staticmethod(exact_finish)
    empty_cache = staticmethod(empty_cache)
    streaming_chunk = staticmethod(streaming_chunk)
