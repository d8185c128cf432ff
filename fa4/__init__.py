"""fa4: FlashAttention-4 in Python (Triton and Gluon). Exact attention, forward and backward, O(S) memory."""
from .inference import flash_attn_combine, flash_attn_with_kvcache
from .interface import flash_attn_func, flash_attn_varlen_func
from . import flop_formulas  # noqa: F401,E402  (FlopCounterMode counts fa4's ops)

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_combine"]
__version__ = "0.1.0"
