"""After the last stage: complete the provenance map and check the build's invariants.

This runs in the builder after the plan, not as a stage, because it must see the model
after every stage, third-party ones included, and a stage cannot be ordered after
stages it does not know. It names no stage: it reads what stages wrote
(``ctx.report.provenance``, ``ctx.expect``) and the model itself.

Invariants (setting ``verify.invariants``: ``"error"``, the default, raises
:class:`~hfbuilder.errors.InvariantError`; ``"warn"`` warns with
:class:`~hfbuilder.errors.InvariantWarning`; ``"off"`` skips them):

``finite``
    No parameter the build wrote (initialized, resized, a head, an adapter) holds NaN or inf;
    with ``check_finite="all"``, no parameter at all, weights read from files included.
``materialized``
    No parameter is left on the meta device unless its provenance says ``uninitialized``.
``expected``
    Every parameter a stage promised with ``ctx.expect(pattern, source)``, or the caller with
    ``with_options(expect={pattern: source})``, came from ``source``.
``tied``
    Weights transformers ties (an LM head to the input embedding, when the config says so) are
    one tensor. A copy would train apart: the embedding would miss the head's gradient.

Under ZeRO-3 each rank checks its own partition (``param.ds_tensor``) only: nothing is gathered.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from . import weights
from .context import (
    PROVENANCE_CHECKPOINT,
    PROVENANCE_INITIALIZED,
    PROVENANCE_ORIGINS,
    PROVENANCE_PRETRAINED,
    PROVENANCE_UNINITIALIZED,
    BuildContext,
    Expectation,
    InvariantResult,
    provenance_origin,
)
from .errors import BuilderInputError, InvariantError, InvariantWarning
from .settings import Settings, setting

INVARIANT_MODES = ("error", "warn", "off")
#: Details listed per failed invariant before "... and N more".
MAX_DETAILS = 20


@dataclass(frozen=True)
class VerifySettings(Settings):
    """What the checks after the last stage do (``configure("verify", ...)``)."""

    stage_name: ClassVar[str] = "verify"

    invariants: Literal["error", "warn", "off"] = setting(
        "error", option="invariants", doc="a failed invariant raises InvariantError (error), warns (warn), or is not checked (off)")
    check_finite: Literal["auto", "written", "all"] = setting(
        "auto", option="check_finite", doc="which weights the finite check reads: auto (every weight on an accelerator, "
                                           "what the build wrote on the CPU), written, or all")
    expect: Mapping[str, str] = setting(
        MappingProxyType({}), option="expect", doc='your own provenance promises, {"v_head.*": "checkpoint"}, checked like a stage\'s')

    def __post_init__(self) -> None:
        super().__post_init__()
        for pattern, source in self.expect.items():
            if not isinstance(pattern, str) or not pattern or source not in PROVENANCE_ORIGINS:
                raise BuilderInputError(
                    f"option expect: {pattern!r}: {source!r} must be a pattern and one of {sorted(PROVENANCE_ORIGINS)}"
                )


def option_expectations(settings: VerifySettings) -> list[Expectation]:
    """The caller's own promises, ``with_options(expect={"v_head.*": "checkpoint"})``, checked like a stage's."""
    return [Expectation(pattern, source, "option expect") for pattern, source in settings.expect.items()]


def parameter_ids(model: Any) -> dict[int, str]:
    """``id(param) -> name``, to follow parameters a stage renames (a head or LoRA wrapping the model)."""
    if model is None or not hasattr(model, "named_parameters"):
        return {}
    return {id(p): name for name, p in model.named_parameters()}


def carry_provenance(ctx: BuildContext, before: dict[int, str]) -> dict[int, str]:
    """Give a parameter that a stage renamed (same tensor, new name) its old provenance entry.

    Returns :func:`parameter_ids` of the model as the stage left it, from the same walk over
    its parameters, for the next stage: one walk per stage, not two.
    """
    if ctx.model is None or not hasattr(ctx.model, "named_parameters"):
        return {}
    prov = ctx.report.provenance
    after: dict[int, str] = {}
    for name, p in ctx.model.named_parameters():
        after[id(p)] = name
        if before and name not in prov:
            old = before.get(id(p))
            if old is not None and old in prov:
                prov[name] = prov[old]
    return after


def complete_provenance(ctx: BuildContext, params: list[tuple[str, Any]] | None = None) -> None:
    """One entry per parameter of the final model, and none for parameters it no longer has.

    A parameter no stage recorded was made by a module's own init (for example by a
    plugin's new layer): ``initialized``, or ``uninitialized`` if it is on the meta device.
    """
    model = ctx.model
    if model is None or not hasattr(model, "named_parameters"):
        return
    prov = ctx.report.provenance
    final: dict[str, str] = {}
    for name, p in params if params is not None else model.named_parameters():
        final[name] = prov.get(name) or (PROVENANCE_UNINITIALIZED if p.is_meta else PROVENANCE_INITIALIZED)
    ctx.report.provenance = final


def _local(p: Any) -> Any:
    """The tensor this rank holds: the ZeRO-3 partition, or the parameter itself."""
    return p.ds_tensor if hasattr(p, "ds_id") and getattr(p, "ds_tensor", None) is not None else p


FINITE_SCOPES = ("auto", "written", "all")


def _in_scope(scope: str, provenance: str, tensor: Any, read_finite: tuple[Any, int] | None = None) -> bool:
    """Whether the ``finite`` invariant reads this parameter.

    ``read_finite``: (parameter, data pointer) as a stage recorded them when it read the tensor
    and found it finite (``BuildContext.read_finite``). While the parameter is that object on that
    memory and no stage marked it changed, it is not read again, whatever the scope.

    ``"written"`` reads what the build itself wrote: initialized tensors, heads, adapters,
    resized matrices (a ``+`` modifier). Weights copied untouched from a file into CPU memory are
    the file's bytes, memory-mapped: reading them all would cost a full pass over the checkpoint
    (a CPU build otherwise never touches most of its pages), so there they are read only with
    ``check_finite="all"``. ``"auto"`` (the default) also reads every weight that lives on an
    accelerator: it was copied there already, and a sum in device memory costs next to nothing.
    """
    if "+" in provenance:
        return True
    if read_finite is not None and read_finite[0] is tensor and tensor.data_ptr() == read_finite[1]:
        return False
    if scope == "all":
        return True
    if scope == "auto" and tensor.device.type not in ("cpu", "meta"):
        return True
    return provenance_origin(provenance) not in (PROVENANCE_PRETRAINED, PROVENANCE_CHECKPOINT)


def reads_loaded_weights(settings: VerifySettings, device: Any) -> bool:
    """Whether the ``finite`` invariant will read weights loaded untouched onto ``device``: a stage that
    reads them can sum each as it arrives instead (``BuildContext.read_finite``)."""
    if settings.invariants == "off":
        return False
    on_accelerator = device is not None and str(device).split(":")[0] not in ("cpu", "meta")
    return settings.check_finite == "all" or (settings.check_finite == "auto" and on_accelerator)


def _result(name: str, problems: list[str]) -> InvariantResult:
    details = problems[:MAX_DETAILS]
    if len(problems) > MAX_DETAILS:
        details.append(f"... and {len(problems) - MAX_DETAILS} more")
    return InvariantResult(name, not problems, details)


def _tied_pairs(model: Any) -> list[tuple[str, str]]:
    """(tied name, name it is tied to) for every pair transformers ties in ``model``.

    Read from each outermost ``PreTrainedModel`` (a head's base included): its
    ``all_tied_weights_keys``, which ``from_pretrained`` trims where a checkpoint holds two
    different tensors, or else the config's ``tie_word_embeddings`` (transformers 4).
    """
    from transformers import PreTrainedModel

    pairs: list[tuple[str, str]] = []
    outer: list[str] = []
    for prefix, module in model.named_modules():
        if not isinstance(module, PreTrainedModel) or any(prefix.startswith(f"{o}.") or not o for o in outer):
            continue
        outer.append(prefix)
        keys = getattr(module, "all_tied_weights_keys", None)
        if keys is None:
            text = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
            out, inp = module.get_output_embeddings(), module.get_input_embeddings()
            if not getattr(text, "tie_word_embeddings", False) or out is None or inp is None:
                continue
            names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
            keys = {names.get(id(out.weight), "output embeddings"): names.get(id(inp.weight), "input embeddings")}
        dot = f"{prefix}." if prefix else ""
        pairs.extend((dot + target, dot + source) for target, source in keys.items())
    return pairs


def _untied(model: Any) -> list[str]:
    """The tied pairs that are two tensors. A name that no longer resolves (LoRA wrapped it) is skipped."""
    problems = []
    for target, source in _tied_pairs(model):
        try:
            a, b = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:
            continue
        if a is not b:
            problems.append(f"{target} is a separate tensor from {source}, which the config ties it to: "
                            "the embedding would not get the head's gradient")
    return problems


def check_invariants(ctx: BuildContext, params: list[tuple[str, Any]] | None = None) -> list[InvariantResult]:
    import torch

    model = ctx.model
    if params is None:
        params = list(model.named_parameters()) if hasattr(model, "named_parameters") else []
    prov = ctx.report.provenance

    scope, checked = ctx.settings("verify").check_finite, ctx.read_finite
    with torch.no_grad():
        nonfinite = weights.nonfinite([(name, _local(p)) for name, p in params
                                       if _in_scope(scope, prov.get(name, ""), _local(p), checked.get(name))])
    finite = _result("finite", [f"{name} holds NaN or inf" for name in nonfinite])

    meta = [
        f"{name} is on the meta device but its provenance says {prov.get(name)!r}"
        for name, p in params
        if p.is_meta and provenance_origin(prov.get(name, "")) != PROVENANCE_UNINITIALIZED
    ]
    materialized = _result("materialized", meta)

    unmet: list[str] = []
    for exp in ctx.report.expectations:
        matched = [name for name, _ in params if fnmatch.fnmatchcase(name, exp.pattern)]
        if not matched:
            unmet.append(f"{exp.by} expects {exp.pattern!r} from {exp.source}, but no parameter matches it")
        unmet.extend(
            f"{name}: expected from {exp.source} (declared by {exp.by}), but it is {prov.get(name)!r}"
            for name in matched
            if provenance_origin(prov.get(name, "")) != exp.source
        )
    expected = _result("expected", unmet)
    return [finite, materialized, expected, _result("tied", _untied(model) if params else [])]


def finish_build(ctx: BuildContext) -> None:
    """Complete the provenance map, then check the invariants as the ``invariants`` option says."""
    start = time.perf_counter()
    try:
        # One walk over the parameters for both.
        params = list(ctx.model.named_parameters()) if hasattr(ctx.model, "named_parameters") else []
        complete_provenance(ctx, params)
        mode = ctx.settings("verify").invariants
        if mode == "off" or ctx.model is None:
            return
        ctx.report.invariants = check_invariants(ctx, params)
    finally:
        ctx.report.verify_seconds = time.perf_counter() - start
    failed = ctx.report.failed_invariants()
    if not failed:
        return
    text = "; ".join(f"{r.name}: {', '.join(r.details)}" for r in failed)
    if mode == "warn":
        for r in failed:
            ctx.warn(f"invariant {r.name} failed: {'; '.join(r.details)}", InvariantWarning)
        return
    raise InvariantError(
        f"the built model breaks {len(failed)} invariant(s): {text}. "
        "Use .with_options(invariants='warn') to build it anyway.",
        report=ctx.report,
    )


__all__ = [
    "INVARIANT_MODES",
    "carry_provenance",
    "check_invariants",
    "complete_provenance",
    "finish_build",
    "VerifySettings",
    "option_expectations",
    "parameter_ids",
]
