"""lossless: the fine-tune's exact bits against the base's, entropy-coded (format/codec_lossless.py).

Every tensor (float of any width, integer, bool; 1-D included) is stored as the zigzagged integer difference of its
bit pattern and the base's, split into byte planes and zstd-coded; rebuilds are bit for bit. `raw` is the same
method under its old name (it used to store the float delta, fp32 wherever bf16 was inexact: larger than the
fine-tune itself). Method notes and measurements: docs/methods/lossless.md.
"""

from __future__ import annotations

from pydantic import Field

from deltapack.format.codec_lossless import encode_bits
from deltapack.methods.base import DeltaMethod, Encoded, TensorJob, register_method


@register_method
class Lossless(DeltaMethod):
    name = "lossless"
    paper = "FM-Delta (NeurIPS'24) / ZipNN (2024): integer bit deltas, byte planes, entropy coding"
    summary = "exact: bit difference to the base, byte planes, zstd (docs/methods/lossless.md)"
    lossless = True
    parts_per_tensor = 1

    level: int = Field(1, ge=1, le=22, description="zstd level (1: measured best size and speed on weight deltas)")

    def encode(self, job: TensorJob, ctx) -> Encoded:
        params, parts = encode_bits(job.finetuned, job.base, level=self.level)
        return Encoded("lossless", params, parts)


@register_method
class Raw(Lossless):
    name = "raw"
    paper = "-"
    summary = "alias of lossless (the exact reference)"
