"""Config files for `compress --config FILE` (JSON or YAML), validated into a pydantic model.

    method: delta-come
    ratio: 32
    calib: data/calib.jsonl
    params: {allocator: optimal, quantizer: gptq}

Precedence, for every command that reads a config: a flag given on the command line (or through its environment
variable) > the config file > the command's default (`resolve`). Method knobs merge key by key: `-p key=value` over
the file's `params`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltapack.errors import InputError


class CompressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str | None = None
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


def resolve(ctx, cfg: BaseModel | None, values: dict) -> dict:
    """`values` (a command's parameters by name) with the config file's settings applied where the command line
    did not give the parameter: flag > config file > default. Only the fields the file sets count."""
    from click.core import ParameterSource

    out = dict(values)
    if cfg is None:
        return out
    for key in cfg.model_fields_set:
        if key not in out or getattr(cfg, key) is None:  # `ratio: null` in a file: no setting
            continue
        src = ctx.get_parameter_source(key)
        if src is None or src in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            out[key] = getattr(cfg, key)
    return out
