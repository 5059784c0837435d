"""Checkpoints into ZeRO-3 partitions: no rank holds the whole checkpoint.

:func:`load_checkpoint_into_partitions` reads, per parameter, only the rows that cover
this rank's partition. :func:`load_pretrained_partitioned` is ``from_pretrained`` done
that way: the model is built partitioned with no weight init, then filled.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..context import PROVENANCE_CHECKPOINT, PROVENANCE_PRETRAINED
from ..errors import BuilderInputError, CheckpointError
from ..weights.match import LoadPlan, check_plan, match_keys
from ..weights.reader import CheckpointReader, Reader, find_checkpoint, open_checkpoint
from ..weights.tied import tensor_groups
from .fill import broadcast_fill, fill, read_rows, scatter_fill
from .partition import build_partitioned, is_partitioned, listed, partition_unpartitioned

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Mapping

    from torch import nn


@dataclass(frozen=True)
class PartitionFill:
    """What :func:`load_checkpoint_into_partitions` did."""

    tensors: int
    #: partitions filled straight from their own rows, with no communication.
    direct: int
    #: partitions not in memory here (NVMe offload), gathered and filled from rank 0.
    gathered: int
    #: partitions rank 0 read and scattered (``read="rank0"``).
    scattered: int = 0
    #: bytes this rank's partitions (and whole buffers) received, and the seconds the filling took.
    bytes: int = 0
    seconds: float = 0.0
    #: parameter name -> provenance label, for every name of every parameter filled.
    provenance: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def facts(self) -> dict[str, Any]:
        """The report's throughput facts: this rank's bytes, and GB/s while it filled them."""
        rate = {"load_gbps": round(self.bytes / self.seconds / 1e9, 3)} if self.seconds > 0 else {}
        return {"load_bytes": self.bytes, **rate}

    def describe(self) -> str:
        how = f"{self.direct} partitions filled from their own rows"
        if self.scattered:
            how = f"{self.scattered} tensors read on rank 0 and scattered to the ranks"
        if self.gathered:
            how += f", {self.gathered} gathered and filled from rank 0"
        rate = f"; {self.bytes / 1e9:.3f} GB into this rank in {self.seconds:.3f} s" if self.seconds > 0 else ""
        return f"loaded {self.tensors} tensors from {self.source} into ZeRO-3 partitions: {how}{rate}"


def _as_reader(reader: Any) -> tuple[Reader, bool]:
    """``(reader, opened here)``: a path is opened; anything else must follow the reader protocol."""
    if isinstance(reader, (str, os.PathLike)):
        return open_checkpoint(reader), True
    if not isinstance(reader, Reader):
        raise BuilderInputError(
            "a checkpoint reader needs keys(), info(key), get(key, device=None) and get_slice(key) "
            f"(hfbuilder.weights.Reader); got {type(reader).__name__}"
        )
    return reader, False


def load_checkpoint_into_partitions(
    model: nn.Module,
    reader: Reader | str | os.PathLike[str],
    plan: LoadPlan | None = None,
    *,
    ds_config: Mapping[str, Any] | None = None,
    label: str = PROVENANCE_CHECKPOINT,
    read: str = "all",
) -> PartitionFill:
    """Load a checkpoint into a ZeRO-3 partitioned model, each rank reading only its own rows.

    ``reader`` follows :class:`hfbuilder.weights.Reader`, or is a path to open.

    Which key fills which tensor: ``plan.sources`` (model name -> checkpoint key, one
    name per tensor) when the caller has matched the keys already, as the checkpoint stage
    does (renamed legacy keys, ignored keys, non-strict loads); ``plan.partial_rows``
    marks matrices the resize stage grew: only the checkpoint's rows are read, the new
    ones keep their values. Without a plan the keys are strict
    (:func:`~hfbuilder.weights.match_keys`): missing keys, unexpected keys and shape
    mismatches raise one :class:`CheckpointError` listing them, before anything is written.

    With ``ds_config``, parameters not yet partitioned are partitioned first. A partition is
    filled straight from the rows that cover it, with no communication; a parameter whose
    partition is not in memory (NVMe offload) is gathered and filled from rank 0 instead.
    Buffers are not partitioned: every rank reads them whole (they are small). Collective
    (all ranks must call it) because of partitioning and that fallback.

    ``read="rank0"``: rank 0 alone reads tensor data and scatters each partition to its rank
    (buffers are broadcast), for storage where one reader beats N; every rank still reads the
    headers, which the key plan needs.
    """
    import torch
    import torch.distributed as dist

    if read not in ("all", "rank0"):
        raise BuilderInputError(f"read must be 'all' or 'rank0', got {read!r}")
    one_reader = read == "rank0" and dist.is_initialized() and dist.get_world_size() > 1

    reader, opened = _as_reader(reader)
    try:
        if ds_config is not None:
            partition_unpartitioned(model, ds_config)
        source = getattr(reader, "file", None) or repr(reader)
        if plan is None:
            plan = match_keys(model, reader)
            check_plan(plan, strict=True, source=source, model_name=type(model).__name__)
        groups = tensor_groups(model)
        group_of = {name: g for g in groups for name in g.names}
        unknown = sorted(n for n in plan.sources if n not in group_of)
        if unknown:
            raise CheckpointError(f"the load plan names tensors {type(model).__name__} does not have: {listed(unknown)}")
        wanted = {id(group_of[name].tensor): key for name, key in plan.sources.items()}
        rows_of = {id(group_of[name].tensor): rows for name, (rows, _) in plan.partial_rows.items()}
        direct = gathered = scattered = filled_bytes = 0
        start = time.perf_counter()
        provenance: dict[str, str] = {}
        data = reader if not one_reader or dist.get_rank() == 0 else None
        with torch.no_grad():
            for group in groups:  # state_dict order: the same on every rank
                key = wanted.get(id(group.tensor))
                if key is None:
                    continue
                tensor, rows = group.tensor, rows_of.get(id(group.tensor))
                if one_reader and not is_partitioned(tensor):
                    broadcast_fill(tensor, data, key, rows)
                elif one_reader and tensor.ds_tensor is not None and getattr(tensor.ds_tensor, "final_location", None) is None:
                    scatter_fill(tensor, data, key, rows)
                    scattered += 1
                elif not is_partitioned(tensor):
                    value = read_rows(reader, key, 0, rows)
                    target = tensor.data if rows is None else tensor.data[:rows]
                    target.copy_(value.reshape(target.shape))
                elif fill(tensor, reader, key, rows):
                    direct += 1
                else:
                    gathered += 1
                local = tensor.ds_tensor if is_partitioned(tensor) and tensor.ds_tensor is not None else tensor
                filled_bytes += local.numel() * local.element_size()
                if group.is_parameter:
                    provenance.update(dict.fromkeys(group.names, label))
        return PartitionFill(len(wanted), direct, gathered, scattered=scattered, provenance=provenance, source=source,
                             bytes=filled_bytes, seconds=time.perf_counter() - start)
    finally:
        if opened and isinstance(reader, CheckpointReader):
            reader.close()


@dataclass
class PretrainedLoad:
    """What :func:`load_pretrained_partitioned` did: a filled model, or why it left the job to ``from_pretrained``."""

    model: Any = None
    #: why the partition loader was not used (then ``model`` is None).
    skipped: str | None = None
    fill: PartitionFill | None = None
    #: checkpoint keys the model does not use (``from_pretrained`` ignores them too).
    unused: list[str] = field(default_factory=list)


def load_pretrained_partitioned(
    path: str, model_class: Any, config: Any, dtype: Any, *, trust_remote_code: bool = False, read: str = "all"
) -> PretrainedLoad:
    """``model_class.from_pretrained(path)`` under ZeRO-3 without transformers' loader, when it can.

    transformers' ZeRO-3 loader reads the whole checkpoint on rank 0 and then gathers the
    model module by module. Here the model is built partitioned with no weight init, and
    each rank fills its own partitions from the safetensors rows that cover them. Taken
    only for a local safetensors checkpoint that covers every weight under transformers'
    own key mapping (:func:`~hfbuilder.weights.map_keys`); otherwise (a hub name, ``.bin``
    files, missing weights, value conversions, a quantized config) the result says why in
    ``skipped`` and the caller uses ``from_pretrained``. Needs an active ``HfDeepSpeedConfig``.
    """
    try:
        fmt, _ = find_checkpoint(path)
    except CheckpointError:
        fmt = None
    if fmt != "safetensors":
        return PretrainedLoad(skipped=f"no local safetensors checkpoint in {path}")
    if getattr(config, "quantization_config", None) is not None:
        return PretrainedLoad(skipped="quantized config")
    with open_checkpoint(path) as reader:
        model = build_partitioned(model_class, config, dtype, trust_remote_code=trust_remote_code)
        plan = match_keys(model, reader, prefixes=True)
        if plan.wrong_dtype:  # hostile or broken: from_pretrained must not get a second chance at it
            check_plan(LoadPlan(wrong_dtype=plan.wrong_dtype, files=plan.files), strict=True, source=reader.file,
                       model_name=type(model).__name__)
        uncovered = [g.name for g in tensor_groups(model) if not any(n in plan.sources for n in g.names)]
        why = None
        if plan.converted:
            why = f"checkpoint keys need a value conversion: {listed(plan.converted)}"
        elif uncovered:
            why = f"the checkpoint lacks {listed(uncovered)}"
        elif plan.mismatched:
            why = f"shapes differ from the config for {listed([n for n, _, _ in plan.mismatched])}"
        if why is not None:
            del model
            return PretrainedLoad(skipped=why)
        done = load_checkpoint_into_partitions(model, reader, plan, label=PROVENANCE_PRETRAINED, read=read)
        stored = set(reader.keys())
    model.eval()  # as from_pretrained leaves it
    if model.can_generate():
        from transformers import GenerationConfig

        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(path)
    return PretrainedLoad(model, None, done, [k for k in plan.unexpected + plan.ignored if k in stored])


__all__ = ["PartitionFill", "PretrainedLoad", "load_checkpoint_into_partitions", "load_pretrained_partitioned"]
