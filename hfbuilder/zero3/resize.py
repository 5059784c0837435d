"""``resize_token_embeddings`` for a partitioned model: rank 0 draws the new rows, every rank writes its partition."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..weights.reader import TensorInfo
from .dist import group_rank, group_src
from .fill import fill
from .partition import empty_partitioned

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass(frozen=True)
class Resized:
    """What :func:`resize_token_embeddings` did."""

    old_rows: int
    new_rows: int
    #: the matrices rebuilt: the input embedding, and the LM head unless it is tied to it.
    matrices: tuple[str, ...]


def resize_token_embeddings(
    model: nn.Module, new_num_tokens: int, ds_config: Mapping[str, Any], mean_resizing: bool = True
) -> Resized:
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
    old_rows = tuple(inp.weight.ds_shape)[0]
    _resize_matrix(model, inp, new_num_tokens, ds_config, mean_resizing, lm_head=False)
    matrices = ["input embeddings"]
    if out is not None and not tied:
        _resize_matrix(model, out, new_num_tokens, ds_config, mean_resizing, lm_head=True)
        matrices.append("output embeddings")
    model.config.get_text_config().vocab_size = new_num_tokens
    model.vocab_size = new_num_tokens
    model.tie_weights()
    return Resized(old_rows, new_num_tokens, tuple(matrices))


class _Rows:
    """The reader protocol over tensors in memory, each the row-wise concatenation of its parts."""

    def __init__(self, tensors: dict[str, list[Any]]) -> None:
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        parts = self.tensors[key]
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        return TensorInfo(shape, str(parts[0].dtype).removeprefix("torch."), "(memory)")

    def get_slice(self, key: str) -> Any:
        return _RowsSlice(self.tensors[key])

    def get(self, key: str, device: Any = None) -> Any:
        import torch

        whole = torch.cat(self.tensors[key])
        return whole if device is None else whole.to(device)


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
    new_weight = empty_partitioned((new_n, dim), weight, ds_config)
    new_bias = empty_partitioned((new_n,), bias, ds_config) if bias is not None else None
    params = [weight] + ([bias] if bias is not None else [])
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
        parts = {"weight": [weight.data[:keep]], "bias": [bias.data[:keep]] if bias is not None else []}
        if added:
            extra_w = torch.empty(added, dim, dtype=weight.dtype, device=weight.device)
            extra_b = torch.empty(added, dtype=bias.dtype, device=bias.device) if bias is not None else None
            if group_rank(weight) == 0:
                tmp = _new_rows(model, module, old_n, added, dim, mean_resizing, lm_head)
                extra_w.copy_(tmp.weight)
                if extra_b is not None:
                    extra_b.copy_(tmp.bias)
            src = group_src(weight)
            ds_dist.broadcast(extra_w, src, group=weight.ds_process_group)
            parts["weight"].append(extra_w)
            if extra_b is not None:
                ds_dist.broadcast(extra_b, src, group=weight.ds_process_group)
                parts["bias"].append(extra_b)
        rows = _Rows({k: v for k, v in parts.items() if v})
        fill(new_weight, rows, "weight")
        if new_bias is not None:
            fill(new_bias, rows, "bias")
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



def fill_grown_rows_partitioned(model: Any, pending: dict[str, tuple[int, int]], mean_resizing: bool) -> list[str]:
    """Rows ``old:new`` of partitioned matrices that a checkpoint with the old row count did not fill:
    made on rank 0 from the loaded rows, as a build off ZeRO-3 makes them
    (:func:`hfbuilder.weights.assign.fill_new_rows`), then re-partitioned. Collective."""
    import deepspeed
    import torch.distributed as dist

    from ..weights.assign import fill_new_rows, init_std

    done = []
    for name, (old, new) in pending.items():  # the same order on every rank: the plan's
        weight = model.get_parameter(name)
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            if not dist.is_initialized() or group_rank(weight) == 0:
                fill_new_rows(weight.data, old, new, mean_resizing, init_std(model))
        done.append(f"{name}[{old}:{new}]")
    return done


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



__all__ = ["Resized", "fill_grown_rows_partitioned", "mean_resized_rows", "resize_token_embeddings"]
