"""The oracle packaged as a backend implementation (registered by tca.backends.reference, loaded on first use)."""

from . import attend, attention, decode_step, prefill, select


class ReferenceBackend:
    attention = staticmethod(attention)
    select = staticmethod(select)
    attend = staticmethod(attend)
    prefill = staticmethod(prefill)
    decode = staticmethod(decode_step)
