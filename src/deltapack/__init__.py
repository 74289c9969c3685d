"""deltapack: store full fine-tunes as compressed deltas against their base, rebuild and serve them."""

__version__ = "0.1.0"

FORMAT_NAME = "deltapack"
FORMAT_VERSION = 3  # 2: entropy-coded parts, the lossless codec; 3: manifest digest, hf/ checksums (docs/format.md)

from deltapack.errors import DeltapackError  # noqa: E402

__all__ = ["__version__", "FORMAT_NAME", "FORMAT_VERSION", "DeltapackError"]
