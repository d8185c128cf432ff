"""fa4: FlashAttention-4 in Python (Triton and Gluon). Exact attention, forward and backward, O(S) memory."""
from .interface import flash_attn_func, flash_attn_varlen_func

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]
__version__ = "0.1.0"
