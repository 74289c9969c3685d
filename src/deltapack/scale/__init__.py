"""Scaling out: many fine-tunes in parallel (many: process pool or Ray), and a Ray Serve
deployment of `deltapack serve` (ray_serve). Ray is optional: it is imported only where it is used."""

from __future__ import annotations


def compress_many(*args, **kwargs):
    """See deltapack.scale.many.compress_many."""
    from deltapack.scale.many import compress_many as run

    return run(*args, **kwargs)


__all__ = ["compress_many"]
