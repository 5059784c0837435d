"""Custom model code (``auto_map`` in a config) runs only when the user asks for it.

transformers asks "Do you wish to run the custom code? [y/N]" on standard input when
``trust_remote_code`` is left unset, so a ``y`` waiting there (``yes | hfbuilder plan DIR``)
runs whatever Python the model directory holds. Every transformers call that can reach
custom code therefore gets an explicit ``trust_remote_code``: False unless the user set the
``trust_remote_code`` option (CLI ``--trust-remote-code``) to True. No prompt is ever shown.
"""

from __future__ import annotations

from typing import Any

from .errors import BuilderInputError

#: The option (and CLI flag ``--trust-remote-code``) that lets a model directory's own code run.
OPTION = "trust_remote_code"


def remote_code_kwargs(model_class: Any, trust: bool) -> dict[str, Any]:
    """``{"trust_remote_code": trust}`` for a transformers auto class, which may resolve to custom
    code; ``{}`` for a concrete class, which is the code that runs and may not take the keyword.
    """
    return {OPTION: trust} if hasattr(model_class, "_model_mapping") else {}


def refusal(path: str, exc: BaseException) -> BuilderInputError | None:
    """The error to raise when transformers refused ``path``'s custom code, else None."""
    if OPTION not in str(exc):
        return None
    return BuilderInputError(
        f"{path} needs its own Python code to load (auto_map in its config), and hfbuilder runs none "
        f"unless you ask: read that code, then pass {OPTION}=True (.with_options({OPTION}=True), "
        f"CLI --trust-remote-code)"
    )


__all__ = ["OPTION", "refusal", "remote_code_kwargs"]
