"""The delta directory format: manifest, bit packing, seeded masks, codecs (spec: docs/format.md)."""

from deltapack.format import codecs  # noqa: F401
from deltapack.format import codec_deltadq  # noqa: F401,E402  (registers the deltadq codec for readers)
from deltapack.format import codec_lossless  # noqa: F401,E402  (registers the lossless codec for readers)
