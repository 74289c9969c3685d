"""raw: kept as a name for `lossless` (methods/lossless.py), which now stores every exact delta.

`exact_dense` is the old storage (the float delta in the narrowest float type that rebuilds the fine-tune bit for
bit); nothing writes it any more, readers still decode such `dense` entries.
"""

from __future__ import annotations

from deltapack.methods.lossless import Raw  # noqa: F401  (registered there)
