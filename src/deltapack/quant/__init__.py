"""Quantizers: round-to-nearest (rtn) and GPTQ, both producing QMatrix (packed codes + fp16 scale/zero)."""

from deltapack.quant.rtn import QMatrix, dequantize_rows, qmatrix_bytes, quantize_rows

__all__ = ["QMatrix", "quantize_rows", "dequantize_rows", "qmatrix_bytes"]
