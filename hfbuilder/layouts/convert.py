"""``hfbuilder.convert``: a reward/critic checkpoint from one framework's layout to another's.

The source is read through its layout's key map (memory-mapped, nothing executed), the
target layout writes it the way its framework does, and the tokenizer files are copied.
Everything is written into a temporary directory beside ``out`` and renamed into place
at the end, so ``out`` is either complete or absent. What could not be carried (a bias
the target has no place for, OpenRLHF's normalization, an LM head the source never had)
is refused or said in the notes, never dropped silently.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import BuilderInputError, CheckpointError
from .base import BODY, HEAD_BIAS, HEAD_WEIGHT, Export, Layout
from .detect import AUTO, check_layout_name, checkpoint_config, checkpoint_folder, resolve_layout
from .registry import available_layouts

#: Files of a tokenizer that ``save_pretrained`` (or DeepSpeed-Chat's ``save_vocabulary``) writes.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip


@dataclass
class Converted:
    """What :func:`convert` read and wrote."""

    src: str
    out: str
    source: str
    target: str
    evidence: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def __str__(self) -> str:
        lines = [f"{self.src} ({self.source}: {self.evidence})", f"  -> {self.out} ({self.target})"]
        lines += [f"  {f}" for f in self.files]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    to: str,
    from_: str | None = None,
    *,
    drop_bias: bool = False,
    plugins: Sequence[Any] = (),
) -> Converted:
    """Write the reward/critic checkpoint ``src`` into the new directory ``out`` in layout ``to``.

    ``from_`` forces the source's layout (default: detected). A head bias the target has no
    place for is refused unless it is 0 or ``drop_bias`` is set (every value then moves by
    the bias). ``plugins`` are registered as ``ModelBuilder.with_plugin`` would, so a third
    party's layouts can be read and written.
    """
    src, out = os.fspath(src), os.fspath(out)
    layouts = {name: layout for name, (layout, _) in available_layouts(plugins).items()}
    if to == AUTO:
        raise BuilderInputError(f"convert needs a target layout; valid layouts: {', '.join(layouts)}")
    check_layout_name(to, layouts)
    if from_ is not None:
        check_layout_name(from_, layouts)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise BuilderInputError(f"{out} already exists; convert writes a new (or empty) directory")
    config = checkpoint_config(src)
    if config is None:
        raise CheckpointError(f"no config.json beside {src}: a conversion writes the model's config, so it needs it")
    resolved = resolve_layout(src, layouts, from_ or AUTO, config)
    target = layouts[to]
    with resolved.open() as view:
        tensors = {name: view.get(name) for name in view.keys()}
        unused = {key: view.get_unused(key) for key in view.unused}
    strange = [n for n in tensors if not n.startswith(BODY) and n not in (HEAD_WEIGHT, HEAD_BIAS)]
    if strange:
        keys = [resolved.key_map.to_source(n) if n.startswith(BODY) else n for n in strange]
        raise CheckpointError(f"{src} ({resolved.layout.name}) has keys outside its body and head: {keys[:10]}")
    if HEAD_WEIGHT not in tensors:
        raise CheckpointError(f"{src} ({resolved.layout.name}) has no value head ({resolved.key_map.weight})")
    notes = _fit_head(tensors, target, drop_bias)
    extras = resolved.extras
    if extras.normalization is not None:
        mean, std = extras.normalization
        notes.append(
            f"reward normalization mean={mean:g}, std={std:g} carried in config.json" if target.keeps_normalization
            else f"reward normalization mean={mean:g}, std={std:g} dropped: {to} has no place for it; "
                 "apply (r - mean) / std to its scores yourself"
        )
    folder = checkpoint_folder(src)
    size, pad = _tokenizer_facts(folder, notes)
    export = Export(tensors, config, extras, unused, size, pad)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
    try:
        notes += target.write(tmp, export)
        for name in os.listdir(folder):
            if name in TOKENIZER_FILES:
                shutil.copy2(os.path.join(folder, name), os.path.join(tmp, name))
        files = sorted(os.listdir(tmp))
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Converted(src, out, resolved.layout.name, to, resolved.evidence, files, notes)


def _fit_head(tensors: dict[str, Any], target: Layout, drop_bias: bool) -> list[str]:
    """Make the head's bias what the target stores; return what was done."""
    bias = tensors.get(HEAD_BIAS)
    if bias is not None and not target.head_bias:
        value = float(bias.float().reshape(-1)[0])
        del tensors[HEAD_BIAS]
        if value == 0.0:
            return [f"the head's bias is 0 and {target.name} has none: left out, values unchanged"]
        if not drop_bias:
            raise CheckpointError(
                f"the source head has a bias ({value:g}) and {target.name}'s head has none: every value would move "
                f"by {-value:g}. Convert to a layout with a bias (hf-tokencls, trl, llamafactory), or accept the "
                "shift with drop_bias=True (--drop-bias)"
            )
        return [f"the head's bias {value:g} dropped (drop_bias): every value is {value:g} lower than the source's"]
    if bias is None and target.head_bias:
        import torch

        tensors[HEAD_BIAS] = torch.zeros(1, dtype=tensors[HEAD_WEIGHT].dtype)
        return [f"{target.name}'s head has a bias and the source's has none: written as 0, values unchanged"]
    return []


def _tokenizer_facts(folder: str, notes: list[str]) -> tuple[int | None, int | None]:
    """``len(tokenizer)`` and its pad id, when ``folder`` has a tokenizer that loads."""
    if not any(name in TOKENIZER_FILES for name in os.listdir(folder)):
        notes.append(f"no tokenizer files in {folder}: none copied")
        return None, None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - its files are still copied; only the checks are skipped
        notes.append(f"the tokenizer in {folder} did not load ({type(exc).__name__}: {exc}); files copied as they are")
        return None, None
    return len(tok), tok.pad_token_id


__all__ = ["TOKENIZER_FILES", "Converted", "convert"]
