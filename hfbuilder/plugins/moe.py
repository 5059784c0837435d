"""The ``moe`` plugin: under ZeRO-3, MoE blocks whose experts are separate modules become leaf modules.

ZeRO-3 gathers a module's parameters when the module is called. An MoE block that calls only
the experts its tokens were routed to calls different experts on different ranks; the ranks
then gather different parameters, their collectives stop matching, and training hangs. DeepSpeed's
remedy is a *leaf* module (``deepspeed.utils.set_z3_leaf_modules``): entering it gathers every
parameter under it, the same on every rank.

Which classes are such blocks depends on the model type, so this plugin owns a hook,
``hfbuilder_zero3_leaf_modules(model_type, config)``, that returns them; its own implementation
lists the known MoE families by class name (strings also match remote-code classes of that
name). After the ``load`` stage it flags the blocks it finds, and skips blocks whose experts
are fused into stacked 3-D weights (transformers 5's Mixtral and Qwen-MoE): one module holds
them all, so every rank gathers the same parameters anyway. It warns when the model has modules
that look like routed experts (a ``ModuleList`` of experts beside a router or gate) that no leaf
covers, neither one set here nor one the DeepSpeed config's ``zero_optimization.leaf_module``
will set at ``deepspeed.initialize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..context import BuildContext
from ..errors import PluginError
from ..hookspecs import hookimpl, hookspec
from ..stage import Stage

#: MoE block classes by model type. Listed by name so nothing is imported; whether an
#: instance needs a leaf is decided on the model (fused experts need none).
BUILT_IN_LEAVES: dict[str, tuple[str, ...]] = {
    "mixtral": ("MixtralSparseMoeBlock",),
    "qwen2_moe": ("Qwen2MoeSparseMoeBlock",),
    "qwen3_moe": ("Qwen3MoeSparseMoeBlock",),
    "qwen3_next": ("Qwen3NextSparseMoeBlock",),
    "olmoe": ("OlmoeSparseMoeBlock",),
    "phimoe": ("PhimoeSparseMoeBlock",),
    "deepseek_v2": ("DeepseekV2Moe", "DeepseekV2MoE"),  # transformers' name, the remote code's name
    "deepseek_v3": ("DeepseekV3MoE",),
    "glm4_moe": ("Glm4MoeMoE",),
    "minimax": ("MiniMaxSparseMoeBlock",),
}


class MoeHookspecs:
    """The hook this plugin adds to the contract (through ``hfbuilder_addhooks``)."""

    @hookspec
    def hfbuilder_zero3_leaf_modules(self, model_type: str | None, config: Any) -> list[type | str] | None:
        """Return the module classes to make ZeRO-3 leaf modules in a model of ``model_type``.

        A class, or its name (``"DeepseekV3MoE"``) or qualified name, as
        ``deepspeed.utils.set_z3_leaf_modules`` takes them. Return MoE blocks whose experts are
        separate modules called in a loop. Every implementation's classes are used.
        """


@dataclass
class LeafPlan:
    """What to flag in one model: class name -> module names, per outcome."""

    #: blocks to flag as leaf modules, and their classes (for ``set_z3_leaf_modules``).
    leaves: dict[str, list[str]] = field(default_factory=dict)
    classes: list[type] = field(default_factory=list)
    #: blocks a hook named whose experts are fused (stacked weights in one module): no leaf needed.
    fused: dict[str, list[str]] = field(default_factory=dict)
    #: blocks that look like routed experts and that no leaf (ours, the caller's, DeepSpeed's) covers.
    unguarded: dict[str, list[str]] = field(default_factory=dict)


def _matches(module: Any, wanted: type | str) -> bool:
    """DeepSpeed's rule: an instance of the class, or the class's name or qualified name."""
    cls = type(module)
    if isinstance(wanted, type):
        return isinstance(module, wanted)
    return wanted in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")


def _shape(p: Any) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", None) or p.shape)  # a ZeRO-3 partition's full shape


def fused_experts(module: Any) -> bool:
    """Whether ``module.experts`` holds every expert as stacked (3-D) weights of one module."""
    from torch import nn

    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module) or isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
        return False
    return any(len(_shape(p)) >= 3 for p in experts.parameters(recurse=False))


def routed_expert_blocks(model: Any) -> dict[str, Any]:
    """Modules that look like routed experts: a ``ModuleList`` of experts beside a router or gate."""
    from torch import nn

    found: dict[str, Any] = {}
    for name, module in model.named_modules():
        children = dict(module.named_children())
        experts = any(isinstance(c, nn.ModuleList) and len(c) > 1 and "expert" in n.lower() for n, c in children.items())
        names = list(children) + [n for n, _ in module.named_parameters(recurse=False)]
        if experts and any("gate" in n.lower() or "router" in n.lower() for n in names):
            found[name] = module
    return found


def deepspeed_leaf_rules(ds_config: dict[str, Any] | None) -> tuple[list[str], list[str], list[str]]:
    """(classes, module names, name suffixes) that ``deepspeed.initialize`` will flag as leaves."""
    zero = (ds_config or {}).get("zero_optimization") or {}
    try:
        from deepspeed.runtime.zero.leaf_module_config import DeepSpeedZeroLeafModuleConfig
    except ImportError:  # a DeepSpeed without config-driven leaf modules
        return [], [], []
    cfg = DeepSpeedZeroLeafModuleConfig(**(zero.get("leaf_module") or {}))
    return list(cfg.classes), list(cfg.names), list(cfg.name_suffixes)


def plan_leaves(model: Any, wanted: list[type | str], deepspeed_rules: tuple[list[str], ...] = ([], [], [])) -> LeafPlan:
    """Decide which blocks of ``model`` become leaves, which are fused, which stay unguarded."""
    plan = LeafPlan()
    leaf_names: list[str] = []
    for name, module in model.named_modules():
        if not any(_matches(module, w) for w in wanted):
            continue
        cls = type(module)
        if fused_experts(module):
            plan.fused.setdefault(cls.__name__, []).append(name)
            continue
        plan.leaves.setdefault(cls.__name__, []).append(name)
        leaf_names.append(name)
        if cls not in plan.classes:
            plan.classes.append(cls)
    classes, names, suffixes = deepspeed_rules
    for name, module in model.named_modules():
        if getattr(module, "_z3_leaf", False) or name in names or any(name.endswith(s) for s in suffixes) or any(
            _matches(module, c) for c in classes
        ):
            leaf_names.append(name)
    for name, module in routed_expert_blocks(model).items():
        covered = any(name == leaf or name.startswith(f"{leaf}.") or not leaf for leaf in leaf_names)
        if not covered:
            plan.unguarded.setdefault(type(module).__name__, []).append(name)
    return plan


def set_leaves(model: Any, plan: LeafPlan) -> int:
    """Flag the planned blocks as ZeRO-3 leaf modules; return how many modules were flagged."""
    if not plan.classes:
        return 0
    from deepspeed.utils import set_z3_leaf_modules

    return len(set_z3_leaf_modules(model, plan.classes))


def _listed(found: dict[str, list[str]]) -> str:
    return ", ".join(f"{cls} ({len(names)}: {names[0]}{', ...' if len(names) > 1 else ''})"
                     for cls, names in sorted(found.items()))


def _wanted(ctx: BuildContext) -> list[type | str]:
    """Every implementation's classes for this model type, each checked; a failure names its plugin."""
    model_type = getattr(ctx.config, "model_type", None)
    caller = getattr(ctx.hook, "hfbuilder_zero3_leaf_modules", None)
    if caller is None:  # a context made without a plugin manager: the built-in list only
        return list(BUILT_IN_LEAVES.get(model_type or "", ()))
    given = {"model_type": model_type, "config": ctx.config}
    out: list[type | str] = []
    for impl in reversed(caller.get_hookimpls()):
        try:
            result = impl.function(*(given[a] for a in impl.argnames)) or []
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name} raised in hfbuilder_zero3_leaf_modules(): {exc!r}") from exc
        if isinstance(result, (str, type)) or not all(isinstance(c, (str, type)) for c in result):
            raise PluginError(f"plugin {impl.plugin_name}: hfbuilder_zero3_leaf_modules() must return a list of "
                              f"classes or class names, got {result!r}")
        out.extend(result)
    return out


@hookimpl
def hfbuilder_addhooks(pluginmanager: Any) -> None:
    pluginmanager.add_hookspecs(MoeHookspecs)


@hookimpl
def hfbuilder_zero3_leaf_modules(model_type: str | None) -> list[type | str]:
    return list(BUILT_IN_LEAVES.get(model_type or "", ()))


@hookimpl
def hfbuilder_after_stage(stage: Stage, ctx: BuildContext) -> list[str] | None:
    """Under ZeRO-3, after the model is made, flag its looped MoE blocks as leaf modules."""
    if not ctx.zero3 or ctx.model is None or "load" not in (stage.name, stage.replaces):
        return None
    plan = plan_leaves(ctx.model, _wanted(ctx), deepspeed_leaf_rules(ctx.ds_config))
    if not ctx.dry_run:
        set_leaves(ctx.model, plan)
    ctx.fact("zero3_leaf_modules", sorted(plan.leaves))
    lines = []
    if plan.leaves:
        verb = "make" if ctx.dry_run else "made"
        lines.append(f"ZeRO-3: {verb} MoE blocks leaf modules (all their experts gathered at once): {_listed(plan.leaves)}")
    if plan.fused:
        lines.append(f"ZeRO-3: no leaf needed, experts fused into one module: {_listed(plan.fused)}")
    if plan.unguarded:
        lines.append(f"ZeRO-3: routed experts left without a leaf module: {_listed(plan.unguarded)}")
        ctx.warn(
            f"under ZeRO-3, modules that look like routed experts are not leaf modules: {_listed(plan.unguarded)}. "
            "Ranks that route tokens to different experts gather different parameters and training hangs. "
            "Return their class from a hfbuilder_zero3_leaf_modules hook implementation, or list it in the "
            "DeepSpeed config's zero_optimization.leaf_module.classes"
        )
    return lines or None


__all__ = [
    "BUILT_IN_LEAVES",
    "LeafPlan",
    "MoeHookspecs",
    "deepspeed_leaf_rules",
    "fused_experts",
    "plan_leaves",
    "routed_expert_blocks",
    "set_leaves",
]
