"""ZeRO-3 done right: every parameter partitioned, the ranks consistent, one dtype, no rank holding the checkpoint.

The face of the package; each name is defined in the module named beside it:

* ``dist``: the distributed set-up, checked cheaply before any work (:func:`check_distributed`)
  and started when needed (:func:`ensure_distributed`).
* ``partition``: :func:`partition_unpartitioned` partitions whatever a stage left
  unpartitioned, in the config's dtype, from rank 0's values; :func:`build_partitioned`
  builds a model partitioned with no weight init, for a checkpoint to fill.
* ``resize``: :func:`resize_token_embeddings` draws the new rows on rank 0 only.
* ``load``: :func:`load_checkpoint_into_partitions` reads, per parameter, only the rows
  that cover this rank's partition; :func:`load_pretrained_partitioned` is
  ``from_pretrained`` done that way.

Nothing here takes a build context: each function takes a model and plain values and
returns what it did; the stage that calls it writes notes and provenance. Checkpoints are
read through :class:`hfbuilder.weights.Reader`.
"""

from .dist import LAUNCHER_VARS, check_distributed, ds_dtype_name, ensure_distributed
from .load import PartitionFill, PretrainedLoad, load_checkpoint_into_partitions, load_pretrained_partitioned
from .partition import (
    build_partitioned,
    check_one_dtype,
    is_partitioned,
    listed,
    partition_unpartitioned,
    unpartitioned_parameters,
    wrong_dtype_parameters,
)
from .resize import Resized, fill_grown_rows_partitioned, mean_resized_rows, resize_token_embeddings

__all__ = [
    "LAUNCHER_VARS",
    "PartitionFill",
    "PretrainedLoad",
    "Resized",
    "build_partitioned",
    "check_distributed",
    "check_one_dtype",
    "ds_dtype_name",
    "ensure_distributed",
    "fill_grown_rows_partitioned",
    "is_partitioned",
    "listed",
    "load_checkpoint_into_partitions",
    "load_pretrained_partitioned",
    "mean_resized_rows",
    "partition_unpartitioned",
    "resize_token_embeddings",
    "unpartitioned_parameters",
    "wrong_dtype_parameters",
]
