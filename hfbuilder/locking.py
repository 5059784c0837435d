"""One build at a time in a process: transformers' loading contexts patch process-global state.

While a model is made, transformers and accelerate replace functions and flags that every
thread shares, and put back on exit whatever they found on entry:

* ``PreTrainedModel.tie_weights`` (a no-op while ``from_pretrained`` builds the model),
  ``PreTrainedModel.init_weights`` and the ``torch.nn.init`` functions in ``torch.nn.init``
  and ``torch.nn.modules.*`` (no-ops, or guarded copies, while weights are skipped);
* torch's default dtype (``torch.set_default_dtype``, the dtype a build asked for);
* ``torch.linspace`` (forced to the CPU while a model is built on the meta device);
* ``torch.nn.Module.register_parameter`` (accelerate's ``init_empty_weights``: deferred builds);
* ``transformers.modeling_utils._is_ds_init_called`` and ``_is_quantized``;
* under ZeRO-3, ``transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref`` (the
  ``zero`` stage), ``deepspeed.zero.Init`` and ``initialize_weights_zero3`` (hfbuilder's own
  partitioned construction).

Two builds interleaving in two threads each save the other's patch as "the original": a
float32 tensor lands in a bf16 build, and ``tie_weights`` stays a no-op for the rest of the
process. So ``ModelBuilder.build_with_report`` and ``ModelBuilder.explain`` hold this lock.
It is reentrant: a stage may build another model. Code of yours that loads models with
transformers in another thread while hfbuilder builds can take it too, with :func:`build_lock`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_LOCK = threading.RLock()


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """Hold the process-wide build lock: no hfbuilder build or explain runs meanwhile."""
    with _LOCK:
        yield


def serialized(fn: F) -> F:
    """Run ``fn`` under :func:`build_lock`."""

    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return fn(*args, **kwargs)

    return locked  # type: ignore[return-value]


__all__ = ["build_lock", "serialized"]
