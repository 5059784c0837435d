"""ZeRO-3 done right: every parameter partitioned, the ranks consistent, one dtype.

The stages call into this module only while a ZeRO-3 build is running (the ``zero``
stage has made transformers build under ``deepspeed.zero.Init``). It keeps four promises:

* **Every parameter is partitioned.** transformers builds resized embeddings outside
  ``zero.Init`` on purpose, and heads are plain modules. :func:`partition_unpartitioned`
  partitions whatever a stage left unpartitioned; the ``zero`` plugin runs it after every
  stage, so a head, LoRA adapter or third-party stage needs no ZeRO-3 code of its own.
* **The ranks agree.** Whatever is partitioned late is broadcast from rank 0 first
  (``zero.Init(module=...)`` does that), and :func:`resize_token_embeddings` draws the
  new rows on rank 0 only.
* **One dtype.** Late parameters are cast to the DeepSpeed config's dtype before they are
  partitioned; DeepSpeed's ``defragment`` asserts when partitions differ in dtype.
* **No rank holds the whole checkpoint.** :func:`load_checkpoint_into_partitions` reads,
  per parameter, only the rows that cover this rank's partition.

Partition layout (DeepSpeed 0.19): a partitioned parameter ``p`` keeps its shape in
``p.ds_shape`` and its element count in ``p.ds_numel``; ``p.ds_tensor`` is a flat tensor of
``n = p.ds_tensor.ds_numel`` elements holding elements ``[r * n, (r + 1) * n)`` of the
flattened tensor, where ``r`` is the rank in ``p.ds_process_group``; the last rank's tail is
padding.

Checkpoint readers
------------------
:func:`load_checkpoint_into_partitions` takes a *reader*: any object with

``keys()``
    the checkpoint's tensor names;
``shape(key)``
    a tensor's shape, without reading it;
``get_slice(key)``
    an object that ``[a:b]`` slices along dim 0 and returns a ``torch.Tensor``, reading only
    those rows (safetensors' ``safe_open(...).get_slice``); optional when
``get(key)``
    returns the whole tensor (used for 0-d tensors and by readers without ``get_slice``).

:class:`SafetensorsReader` is one, over a ``.safetensors`` file, a directory holding
``model.safetensors`` or a sharded ``model.safetensors.index.json``, or the index itself;
a plain path is opened with it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .context import PROVENANCE_CHECKPOINT, PROVENANCE_PRETRAINED, BuildContext
from .errors import BuilderInputError, CheckpointError, DistributedSetupError, InvariantError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: What ``deepspeed``/``torchrun`` set for every process; ``deepspeed.init_distributed`` reads them.
LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_MAX_LISTED = 20


# -- configuration -------------------------------------------------------------------


def ds_dtype_name(ds_config: Mapping[str, Any]) -> str:
    """The parameter dtype a DeepSpeed config trains in: ``bfloat16``, ``float16`` or ``float32``.

    ``zero.Init`` creates every partition in this dtype, so everything partitioned later
    must have it too.
    """
    for key, dtype in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16")):
        section = ds_config.get(key)
        if isinstance(section, Mapping) and section.get("enabled") in (True, "auto"):
            return dtype
    return "float32"


def check_distributed() -> None:
    """Raise :class:`DistributedSetupError` unless :func:`ensure_distributed` can succeed.

    Cheap and side-effect free, so the ``zero`` stage can call it from ``check()``, before
    any stage reads a weight. DeepSpeed itself would try MPI discovery and fail with a
    traceback about ``mpi4py``.
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedSetupError("ZeRO-3 needs torch.distributed, which this torch build does not have")
    if dist.is_initialized():
        if "LOCAL_RANK" not in os.environ:
            raise DistributedSetupError(
                "torch.distributed is initialized but LOCAL_RANK is not set; deepspeed.zero.Init reads it "
                "to pick this process's device. Set LOCAL_RANK (the rank on this node), as the deepspeed "
                "launcher and torchrun do."
            )
        return
    missing = [v for v in LAUNCHER_VARS if v not in os.environ]
    if missing:
        raise DistributedSetupError(
            "ZeRO-3 needs torch.distributed, which is not initialized, and the environment lacks "
            f"{', '.join(missing)}. Launch with `deepspeed train.py` or `torchrun --nproc_per_node=N train.py`, "
            "call deepspeed.init_distributed() before building, or set MASTER_ADDR, MASTER_PORT, RANK, "
            "WORLD_SIZE and LOCAL_RANK yourself (127.0.0.1, 29500, 0, 1, 0 for a single process)."
        )


def ensure_distributed() -> None:
    """Initialize ``deepspeed.comm`` (and torch.distributed) unless the caller already has.

    If the caller initialized torch.distributed directly, DeepSpeed wraps that process
    group instead of making another.
    """
    check_distributed()
    import deepspeed.comm as ds_dist
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from .distributed import init_distributed

    if dist.is_initialized() and ds_dist.is_initialized():
        return
    # The CPU accelerator names "ccl" only when oneCCL is installed; gloo otherwise. Bounded by
    # HFBUILDER_DIST_TIMEOUT: a rank whose peers never come fails fast with DistributedSetupError.
    init_distributed(get_accelerator().communication_backend_name())


def _group_rank(param: Any) -> int:
    """This process's rank in ``param``'s partition group (``modifier_rank`` counts in it)."""
    import deepspeed.comm as ds_dist

    return ds_dist.get_rank(group=param.ds_process_group)


# -- partitioning ----------------------------------------------------------------------


def is_partitioned(param: Any) -> bool:
    """True for a parameter that ``deepspeed.zero.Init`` has taken over."""
    return hasattr(param, "ds_id")


def unpartitioned_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters DeepSpeed does not manage, in ``named_parameters`` order (the same on every rank)."""
    return [(n, p) for n, p in model.named_parameters() if not is_partitioned(p)]


def partition_unpartitioned(model: nn.Module, ds_config: Mapping[str, Any]) -> list[str]:
    """Partition every parameter of ``model`` that is not yet partitioned; return their names.

    Each is first cast to the config's dtype, then handed to ``zero.Init(module=...)``,
    which broadcasts rank 0's values before it partitions, so a head initialized
    differently on each rank ends up with rank 0's weights everywhere. Every rank must call
    this at the same point of the build (collective).
    """
    import deepspeed
    import torch

    todo = unpartitioned_parameters(model)
    if not todo:
        return []
    meta = [n for n, p in todo if p.is_meta]
    if meta:
        raise InvariantError(
            f"cannot partition parameters that are still on the meta device (no values yet): {_listed(meta)}"
        )
    dtype = getattr(torch, ds_dtype_name(ds_config))
    holder = torch.nn.Module()
    with torch.no_grad():
        for i, (_, p) in enumerate(todo):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
            holder.register_parameter(f"p{i}", p)  # the same Parameter objects: the model sees the change
    deepspeed.zero.Init(module=holder, config_dict_or_path=dict(ds_config))
    return [n for n, _ in todo]


def wrong_dtype_parameters(model: nn.Module, ds_config: Mapping[str, Any]) -> list[str]:
    """Names of floating-point parameters whose dtype is not the config's."""
    import torch

    dtype = getattr(torch, ds_dtype_name(ds_config))
    return [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]


def check_one_dtype(model: nn.Module, ds_config: Mapping[str, Any], after: str) -> None:
    """Raise unless every floating parameter has the config's dtype (``deepspeed.initialize`` asserts it)."""
    wrong = wrong_dtype_parameters(model, ds_config)
    if wrong:
        raise InvariantError(
            f"under ZeRO-3 every parameter must be {ds_dtype_name(ds_config)} (the DeepSpeed config's dtype; "
            f"deepspeed.initialize asserts otherwise), but after stage {after!r} these are not: {_listed(wrong)}"
        )


# -- building without wasted work -------------------------------------------------------


@functools.cache
def _init_without_broadcast() -> type:
    """``deepspeed.zero.Init`` minus the broadcast of each new parameter from rank 0.

    ``zero.Init`` broadcasts every parameter before partitioning it so that the ranks
    agree on its initial values. For a tensor that is about to be overwritten from a
    checkpoint those values are uninitialized memory: broadcasting them costs a full
    model's worth of communication and touches every page of every full tensor. Falls
    back to plain ``zero.Init`` if DeepSpeed's internals have changed.
    """
    import deepspeed

    base = deepspeed.zero.Init
    if not all(hasattr(base, a) for a in ("_zero_init_param", "_convert_to_deepspeed_param")):
        return base

    class InitWithoutBroadcast(base):  # type: ignore[misc, valid-type]
        def _zero_init_param(self, param: Any) -> None:
            self._convert_to_deepspeed_param(param)
            param.partition()

    return InitWithoutBroadcast


@contextlib.contextmanager
def _construction_for_fill() -> Iterator[None]:
    """While transformers builds a model whose every weight a checkpoint will fill:
    no ``initialize_weights_zero3`` (it gathers each module to init it on rank 0) and no
    broadcast of uninitialized memory."""
    import deepspeed
    from transformers.integrations import deepspeed as hf_ds

    saved_init = deepspeed.zero.Init
    saved_weights = getattr(hf_ds, "initialize_weights_zero3", None)
    deepspeed.zero.Init = _init_without_broadcast()  # transformers looks it up at call time
    if saved_weights is not None:
        hf_ds.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        deepspeed.zero.Init = saved_init
        if saved_weights is not None:
            hf_ds.initialize_weights_zero3 = saved_weights


def build_partitioned(model_class: Any, config: Any, dtype: Any) -> nn.Module:
    """``model_class.from_config`` under the active ``HfDeepSpeedConfig``: partitioned, values undefined.

    Only for a model that a checkpoint fills completely right after.
    """
    kwargs = {} if dtype is None or dtype == "auto" else {"dtype": dtype}
    with _construction_for_fill():
        return model_class.from_config(config, **kwargs)


def _empty_partitioned(shape: tuple[int, ...], like: Any, ds_config: Mapping[str, Any]) -> Any:
    """A new partitioned parameter of ``shape``, ``like``'s dtype and ``requires_grad``; values undefined.

    The full tensor is allocated but never written, so its pages are never made resident.
    """
    import torch

    holder = torch.nn.Module()
    holder.p = torch.nn.Parameter(torch.empty(shape, dtype=like.dtype), requires_grad=like.requires_grad)
    _init_without_broadcast()(module=holder, config_dict_or_path=dict(ds_config))
    return holder.p


# -- resizing ---------------------------------------------------------------------------


def resize_token_embeddings(
    model: nn.Module, new_num_tokens: int, ds_config: Mapping[str, Any], mean_resizing: bool = True
) -> None:
    """``model.resize_token_embeddings(new_num_tokens)`` for a partitioned model, done right.

    transformers' version builds the new matrices unpartitioned on every rank and draws
    the new rows on each rank independently. Here the old matrix is gathered, rank 0 draws
    the new rows with transformers' own initializers (mean resizing or ``_init_weights``)
    and broadcasts just those rows, and each rank writes its own partition of a new
    partitioned matrix. A tied LM head follows the embedding through ``tie_weights``.
    """
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is inp.weight
    _resize_matrix(model, inp, new_num_tokens, ds_config, mean_resizing, lm_head=False)
    if out is not None and not tied:
        _resize_matrix(model, out, new_num_tokens, ds_config, mean_resizing, lm_head=True)
    model.config.get_text_config().vocab_size = new_num_tokens
    model.vocab_size = new_num_tokens
    model.tie_weights()


class _Rows:
    """The reader protocol over tensors in memory, each the row-wise concatenation of its parts."""

    def __init__(self, tensors: dict[str, list[Any]]) -> None:
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        parts = self.tensors[key]
        return (sum(p.shape[0] for p in parts), *parts[0].shape[1:])

    def get_slice(self, key: str) -> Any:
        return _RowsSlice(self.tensors[key])

    def get(self, key: str) -> Any:
        import torch

        return torch.cat(self.tensors[key])


class _RowsSlice:
    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def __getitem__(self, index: slice) -> Any:
        import torch

        start, stop = index.start or 0, index.stop
        pieces, offset = [], 0
        for part in self.parts:
            lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
            if lo < hi:
                pieces.append(part[lo:hi])
            offset += part.shape[0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _resize_matrix(
    model: nn.Module, module: nn.Module, new_n: int, ds_config: Mapping[str, Any], mean_resizing: bool, lm_head: bool
) -> None:
    import deepspeed
    import deepspeed.comm as ds_dist
    import torch

    weight = module.weight
    bias = getattr(module, "bias", None) if lm_head else None
    old_n, dim = weight.ds_shape
    keep = min(old_n, new_n)
    added = new_n - keep
    new_weight = _empty_partitioned((new_n, dim), weight, ds_config)
    new_bias = _empty_partitioned((new_n,), bias, ds_config) if bias is not None else None
    params = [weight] + ([bias] if bias is not None else [])
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
        parts = {"weight": [weight.data[:keep]], "bias": [bias.data[:keep]] if bias is not None else []}
        if added:
            extra_w = torch.empty(added, dim, dtype=weight.dtype, device=weight.device)
            extra_b = torch.empty(added, dtype=bias.dtype, device=bias.device) if bias is not None else None
            if _group_rank(weight) == 0:
                tmp = _new_rows(model, module, old_n, added, dim, mean_resizing, lm_head)
                extra_w.copy_(tmp.weight)
                if extra_b is not None:
                    extra_b.copy_(tmp.bias)
            src = _group_src(weight)
            ds_dist.broadcast(extra_w, src, group=weight.ds_process_group)
            parts["weight"].append(extra_w)
            if extra_b is not None:
                ds_dist.broadcast(extra_b, src, group=weight.ds_process_group)
                parts["bias"].append(extra_b)
        rows = _Rows({k: v for k, v in parts.items() if v})
        _fill(new_weight, rows, "weight")
        if new_bias is not None:
            _fill(new_bias, rows, "bias")
    module.weight = new_weight
    if new_bias is not None:
        module.bias = new_bias
    if lm_head:
        module.out_features = new_n
    else:
        module.num_embeddings = new_n
        if module.padding_idx is not None and new_n - 1 < module.padding_idx:
            module.padding_idx = None


def _new_rows(model: Any, old: Any, old_n: int, added: int, dim: int, mean_resizing: bool, lm_head: bool) -> Any:
    """On rank 0, with ``old`` gathered: a plain module whose rows are the ``added`` new ones.

    ``mean_resizing=False`` uses the model's ``_init_weights``, as transformers does. Mean
    resizing draws from the same distribution as transformers' ``_init_added_*_with_mean``,
    see :func:`mean_resized_rows`; the bias, if any, uses transformers' own helper.
    """
    import torch

    if lm_head:
        tmp = torch.nn.Linear(dim, added, bias=old.bias is not None, dtype=old.weight.dtype)
    else:
        tmp = torch.nn.Embedding(added, dim, dtype=old.weight.dtype)
    if not mean_resizing:
        model._init_weights(tmp)
        return tmp
    with torch.no_grad():
        tmp.weight.copy_(mean_resized_rows(old.weight.data[:old_n], added))
    if lm_head and old.bias is not None:
        model._init_added_lm_head_bias_with_mean(old, tmp, added)
    return tmp


def mean_resized_rows(weight: torch.Tensor, added: int, chunk_bytes: int = 1 << 24) -> torch.Tensor:
    """``added`` rows drawn like transformers' mean resizing (``_init_added_embeddings_weights_with_mean``).

    The same distribution, N(mean, 1e-9 * covariance) of the existing rows, or the mean
    itself when that covariance is not positive definite; but the mean and covariance are
    accumulated in fp32 chunks of ``chunk_bytes``, where transformers makes two fp32 copies
    of the whole matrix. For a 50k x 512 bf16 embedding that is 200 MiB less on rank 0,
    the one rank that draws the rows.
    """
    import torch

    n, dim = weight.shape
    step = max(1, chunk_bytes // (4 * dim))
    mean = torch.zeros(dim, dtype=torch.float32, device=weight.device)
    for i in range(0, n, step):
        mean += weight[i : i + step].float().sum(dim=0)
    mean /= n
    covariance = torch.zeros(dim, dim, dtype=torch.float32, device=weight.device)
    for i in range(0, n, step):
        centered = weight[i : i + step].float() - mean
        covariance.addmm_(centered.T, centered)
    covariance /= n
    epsilon = 1e-9
    if torch.distributions.constraints.positive_definite.check(epsilon * covariance).all():
        normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=epsilon * covariance)
        return normal.sample((added,)).to(weight.dtype)
    return mean[None, :].repeat(added, 1).to(weight.dtype)


def _group_src(param: Any) -> int:
    """The global rank of rank 0 in ``param``'s partition group."""
    import deepspeed.comm as ds_dist

    group = param.ds_process_group
    return 0 if group == ds_dist.get_world_group() else ds_dist.get_global_rank(group, 0)


# -- checkpoints -----------------------------------------------------------------------------


class _RowSlice:
    """``get_slice`` result that opens the file for each read, so no mapping outlives a tensor."""

    def __init__(self, path: str, key: str) -> None:
        self.path, self.key = path, key

    def __getitem__(self, index: Any) -> torch.Tensor:
        from safetensors import safe_open

        # Each read maps the file afresh and unmaps it on exit: the pages read do not
        # stay resident, so a rank's RSS grows by its partition, not by the file.
        with safe_open(self.path, framework="pt") as fh:
            return fh.get_slice(self.key)[index]


class SafetensorsReader:
    """The reader protocol over safetensors files: shapes from the headers, rows on demand."""

    def __init__(self, files: Iterable[str | os.PathLike[str]]) -> None:
        from safetensors import safe_open

        self.files = [os.fspath(f) for f in files]
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in self.files:
            try:
                with safe_open(path, framework="pt") as fh:
                    for key in fh.keys():
                        self._where[key] = path
                        self._shapes[key] = tuple(fh.get_slice(key).get_shape())
            except (OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
            except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt header
                raise CheckpointError(f"cannot read safetensors file {path}: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> SafetensorsReader:
        """A ``.safetensors`` file, an index JSON, or a directory holding either."""
        files = safetensors_files(path)
        if files is None:
            raise CheckpointError(
                f"{os.fspath(path)!r} is not a safetensors file, an index, or a directory holding "
                f"{SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}"
            )
        return cls(files)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get_slice(self, key: str) -> _RowSlice:
        return _RowSlice(self._where[key], key)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._where[key], framework="pt") as fh:
            return fh.get_tensor(key)

    def __repr__(self) -> str:
        return f"SafetensorsReader({self.files[0] if len(self.files) == 1 else self.files!r})"


def safetensors_files(path: str | os.PathLike[str]) -> list[str] | None:
    """The safetensors files ``path`` names (file, index or directory), or None if it names none."""
    path = os.fspath(path)
    if os.path.isdir(path):
        single = os.path.join(path, SAFE_WEIGHTS_NAME)
        if os.path.isfile(single):
            return [single]
        index = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
        return safetensors_files(index) if os.path.isfile(index) else None
    if path.endswith(".index.json") and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the safetensors index {path}: {exc}") from exc
        folder = os.path.dirname(path)
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    if path.endswith(".safetensors") and os.path.isfile(path):
        return [path]
    return None


class _Adapted:
    """A reader with ``info(key).shape`` and ``get_tensor(key)`` (``hfbuilder.checkpoint_io``) seen
    through the protocol's ``shape`` and ``get``."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        if hasattr(reader, "get_slice"):
            self.get_slice = reader.get_slice

    def keys(self) -> Any:
        return self.reader.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.reader.shape(key) if hasattr(self.reader, "shape") else self.reader.info(key).shape)

    def get(self, key: str) -> Any:
        return self.reader.get(key) if hasattr(self.reader, "get") else self.reader.get_tensor(key)

    def __repr__(self) -> str:
        return repr(self.reader)


def _as_reader(reader: Any) -> Any:
    if isinstance(reader, (str, os.PathLike)):
        return SafetensorsReader.from_path(reader)
    has_shape = hasattr(reader, "shape") or hasattr(reader, "info")
    has_data = any(hasattr(reader, a) for a in ("get_slice", "get", "get_tensor"))
    if not (hasattr(reader, "keys") and has_shape and has_data):
        raise BuilderInputError(
            f"a checkpoint reader needs keys(), shape(key) and get_slice(key) or get(key); got {type(reader).__name__}"
        )
    if hasattr(reader, "shape") and (hasattr(reader, "get") or not hasattr(reader, "get_tensor")):
        return reader
    return _Adapted(reader)


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(names) > _MAX_LISTED else ''}] ({len(names)})"


#: At most a screenful of names, for messages.
listed = _listed


def _targets(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, Any]]:
    """Every state-dict entry grouped by tensor: aliases (tied weights) share one entry."""
    aliases: dict[int, list[str]] = {}
    tensors: dict[int, Any] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    return aliases, tensors


def check_checkpoint_keys(model: nn.Module, reader: Any, source: str = "the checkpoint") -> dict[int, str]:
    """Strict keys: map each model tensor to its checkpoint key, or raise :class:`CheckpointError`.

    A tensor with several names (tied weights) needs just one of them in the checkpoint.
    """
    aliases, tensors = _targets(model)
    ckpt = set(reader.keys())
    known = {name for names in aliases.values() for name in names}
    chosen: dict[int, str] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for tid, names in aliases.items():
        present = [n for n in names if n in ckpt]
        if not present:
            missing.append(names[0])
            continue
        expected = tuple(getattr(tensors[tid], "ds_shape", tensors[tid].shape))
        for name in present:
            found = tuple(reader.shape(name))
            if found != expected:
                mismatched.append(f"{name}: checkpoint {found} vs model {expected}")
        chosen[tid] = present[0]
    unexpected = sorted(ckpt - known)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(sorted(missing))}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_listed(sorted(mismatched))}")
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(parts))
    return chosen


def load_checkpoint_into_partitions(
    model: nn.Module,
    reader: Any,
    ctx: BuildContext | None = None,
    *,
    sources: Mapping[str, str] | None = None,
    partial_rows: Mapping[str, tuple[int, int]] | None = None,
    use_plan: bool = True,
    provenance: str = PROVENANCE_CHECKPOINT,
) -> None:
    """Load a checkpoint into a ZeRO-3 partitioned model, each rank reading only its own rows.

    ``reader`` follows the reader protocol in this module's docstring, or is a
    ``hfbuilder.checkpoint_io`` reader (``info``/``get_tensor``), or a path opened with
    :class:`SafetensorsReader`.

    Which key fills which tensor:

    * ``sources`` (model state-dict name -> checkpoint key, one name per tensor), when the
      caller has matched the keys already, as the ``checkpoint`` stage does (renamed legacy
      keys, ignored keys, non-strict loads). ``partial_rows`` (name -> (rows in the
      checkpoint, rows in the model)) marks matrices the resize stage grew: only the
      checkpoint's rows are read, the new ones keep their values. Both default to the
      ``checkpoint_plan`` the checkpoint stage leaves in ``ctx.state`` (``use_plan=False``:
      ignore it).
    * otherwise strict, exact keys: missing keys, unexpected keys and shape mismatches
      raise :class:`CheckpointError` listing them, before anything is written. A tied
      tensor needs one of its names.

    Parameters not yet partitioned are partitioned first. A partition is filled straight
    from the rows that cover it, with no communication; a parameter whose partition is
    not in memory (NVMe offload) is gathered and filled from rank 0 instead. Buffers are
    not partitioned: every rank reads them whole (they are small). Collective (all ranks
    must call it) because of partitioning and that fallback.
    """
    import torch

    reader = _as_reader(reader)
    if ctx is not None and ctx.ds_config is not None:
        partition_unpartitioned(model, ctx.ds_config)
    plan = ctx.state.get("checkpoint_plan") if ctx is not None and sources is None and use_plan else None
    if plan is not None:
        sources = plan.sources
        partial_rows = partial_rows if partial_rows is not None else getattr(plan, "partial_rows", None)
    aliases, tensors = _targets(model)
    if sources is None:
        chosen = check_checkpoint_keys(model, reader, source=f"checkpoint {reader!r}")
        limits: dict[int, int] = {}
    else:
        tid_of = {name: tid for tid, names in aliases.items() for name in names}
        unknown = sorted(n for n in sources if n not in tid_of)
        if unknown:
            raise CheckpointError(f"sources name tensors {type(model).__name__} does not have: {_listed(unknown)}")
        chosen = {tid_of[name]: key for name, key in sources.items()}
        limits = {tid_of[name]: rows for name, (rows, _) in (partial_rows or {}).items()}
    direct = gathered = 0
    with torch.no_grad():
        for tid, key in chosen.items():  # state_dict order: the same on every rank
            tensor, rows = tensors[tid], limits.get(tid)
            if not is_partitioned(tensor):
                value = _read(reader, key, 0, rows)
                target = tensor.data if rows is None else tensor.data[:rows]
                target.copy_(value.reshape(target.shape))
            elif _fill(tensor, reader, key, rows):
                direct += 1
            else:
                gathered += 1
    if ctx is not None:
        for tid in chosen:
            for name in aliases[tid]:
                if isinstance(tensors[tid], torch.nn.Parameter):
                    ctx.report.provenance[name] = provenance
        how = f"{direct} partitions filled from their own rows"
        if gathered:
            how += f", {gathered} gathered and filled from rank 0"
        ctx.note(f"loaded {len(chosen)} tensors from {reader!r} into ZeRO-3 partitions: {how}")


def _read(reader: Any, key: str, start: int, stop: int | None) -> torch.Tensor:
    """Rows ``start:stop`` of ``key`` (to the end when ``stop`` is None)."""
    shape = tuple(reader.shape(key))
    if not shape:
        return reader.get(key).reshape(1)
    stop = shape[0] if stop is None else stop
    if hasattr(reader, "get_slice"):
        return reader.get_slice(key)[start:stop]
    return reader.get(key)[start:stop]


def _fill_partition(param: Any, reader: Any, key: str, rows: int | None = None) -> bool:
    """Copy this rank's share of ``key`` (its first ``rows`` rows) into ``param.ds_tensor``.

    False if the partition is not in memory here (NVMe offload, or gathered right now).
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    part = param.ds_tensor
    if part is None or getattr(part, "final_location", None) is not None or param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        return False
    shape = tuple(param.ds_shape)
    row = math.prod(shape[1:]) if shape else 1
    size = part.ds_numel
    start = param.ds_zero_partition_rank * size
    stop = min(start + size, param.ds_numel, param.ds_numel if rows is None else rows * row)
    if start >= stop:
        return True  # this rank holds only padding, or only rows the checkpoint does not have
    first, last = start // row, -(-stop // row)
    values = _read(reader, key, first, last if shape else None).reshape(-1)
    part.data[: stop - start].copy_(values[start - first * row : stop - first * row])
    return True


def _fill(param: Any, reader: Any, key: str, rows: int | None = None) -> bool:
    """Fill ``param`` from ``key``: its own partition directly, else gathered from rank 0. True if direct."""
    if _fill_partition(param, reader, key, rows):
        return True
    _fill_gathered(param, reader, key, rows)
    return False


def _fill_gathered(param: Any, reader: Any, key: str, rows: int | None = None) -> None:
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if _group_rank(param) == 0:
            target = param.data if rows is None else param.data[:rows]
            target.copy_(_read(reader, key, 0, rows).reshape(target.shape))


# -- from_pretrained, partition by partition --------------------------------------------------


class _RenamedReader:
    """A reader seen through transformers' key renames and base-model prefix rule."""

    def __init__(self, reader: Any, to_source: dict[str, str], dropped: list[str]) -> None:
        self.reader, self.to_source, self.dropped = reader, to_source, dropped

    def keys(self) -> list[str]:
        return list(self.to_source)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.shape(self.to_source[key])

    def get_slice(self, key: str) -> Any:
        return self.reader.get_slice(self.to_source[key])

    def get(self, key: str) -> Any:
        return self.reader.get(self.to_source[key])

    def __repr__(self) -> str:
        return repr(self.reader)


def _pretrained_view(model: Any, reader: Any) -> _RenamedReader | str:
    """The checkpoint under the model's key names, as ``from_pretrained`` maps them, or why not."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError as exc:  # a transformers without the v5 loading API
        return f"transformers' key-mapping API is missing ({exc})"
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if len(renamings) + len(converters) != len(transforms):
        return "the model registers weight transforms other than renames"
    expected = dict.fromkeys(model.state_dict(keep_vars=True), True)
    to_source: dict[str, str] = {}
    dropped: list[str] = []
    for source in reader.keys():
        target, converted = rename_source_key(source, renamings, converters, model.base_model_prefix, expected)
        if converted is not None:
            return f"checkpoint key {source!r} needs a value conversion"
        if target in expected and target not in to_source:
            to_source[target] = source
        else:
            dropped.append(source)
    return _RenamedReader(reader, to_source, dropped)


def load_pretrained_partitioned(ctx: BuildContext, config: Any, dtype: Any) -> nn.Module | None:
    """``from_pretrained`` under ZeRO-3 without transformers' loader, or None to use it.

    transformers' ZeRO-3 loader reads the whole checkpoint on rank 0 and then gathers the
    model module by module. Here the model is built partitioned with no weight init, and
    each rank fills its own partitions from the safetensors rows that cover them. Taken
    only for a local safetensors checkpoint that covers every weight under transformers'
    own key mapping; otherwise (a hub name, ``.bin`` files, missing weights, value
    conversions, a quantized config) it returns None and the caller uses ``from_pretrained``.
    """
    files = safetensors_files(ctx.model_name_or_path)
    if files is None:
        ctx.note(f"ZeRO-3 partition loader skipped: no local safetensors checkpoint in {ctx.model_name_or_path}")
        return None
    if getattr(config, "quantization_config", None) is not None:
        ctx.note("ZeRO-3 partition loader skipped: quantized config")
        return None
    reader = SafetensorsReader(files)
    model = build_partitioned(ctx.model_class, config, dtype)
    view = _pretrained_view(model, reader)
    if not isinstance(view, str):
        aliases, tensors = _targets(model)
        covered = set(view.keys())
        uncovered = [names[0] for names in aliases.values() if not covered.intersection(names)]
        mismatched = [
            name
            for tid, names in aliases.items()
            for name in names
            if name in covered and tuple(view.shape(name)) != tuple(getattr(tensors[tid], "ds_shape", tensors[tid].shape))
        ]
        if uncovered:
            view = f"the checkpoint lacks {_listed(uncovered)}"
        elif mismatched:
            view = f"shapes differ from the config for {_listed(mismatched)}"
    if isinstance(view, str):
        ctx.note(f"ZeRO-3 partition loader skipped: {view}; using from_pretrained")
        del model
        return None
    load_checkpoint_into_partitions(model, view, ctx, use_plan=False, provenance=PROVENANCE_PRETRAINED)
    if view.dropped:
        ctx.note(f"checkpoint keys the model does not use (from_pretrained ignores them too): {_listed(view.dropped)}")
    model.eval()  # as from_pretrained leaves it
    if model.can_generate():
        from transformers import GenerationConfig

        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(ctx.model_name_or_path)
    return model


__all__ = [
    "LAUNCHER_VARS",
    "SafetensorsReader",
    "check_checkpoint_keys",
    "check_distributed",
    "ds_dtype_name",
    "ensure_distributed",
    "check_one_dtype",
    "listed",
    "is_partitioned",
    "load_checkpoint_into_partitions",
    "load_pretrained_partitioned",
    "partition_unpartitioned",
    "resize_token_embeddings",
    "unpartitioned_parameters",
]
