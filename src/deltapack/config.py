"""Config files for `compress --config FILE` (JSON or YAML), validated into a pydantic model.

    method: delta-come
    ratio: 32
    calib: data/calib.jsonl
    params: {allocator: optimal, quantizer: gptq}
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltapack.errors import InputError


class CompressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = "lowrank"
    ratio: float | None = Field(None, gt=1)
    calib: str | None = None
    params: dict = Field(default_factory=dict)


def load_compress_config(path: str | Path) -> CompressConfig:
    p = Path(path)
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:
        raise InputError(f"cannot parse config {p}: {e}") from e
    try:
        return CompressConfig.model_validate(raw or {})
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(f"config {p}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from e
