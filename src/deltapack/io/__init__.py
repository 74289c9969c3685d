"""Model IO: lazy shard reading (safetensors / safe .bin / hub / GGUF) and atomic, bounded-size writing."""

from deltapack.io.sources import ModelSource, TensorMeta, open_model
from deltapack.io.writer import AtomicDir, PlannedShardWriter, StreamingShardWriter, write_weights

__all__ = ["ModelSource", "TensorMeta", "open_model", "AtomicDir", "PlannedShardWriter", "StreamingShardWriter", "write_weights"]
