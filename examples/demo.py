"""The quick-start demo: make a tiny OPT model on disk, build it through the whole chain,
and print the plan and what each stage did. Runs in seconds on a CPU; downloads nothing.
"""

from __future__ import annotations

import tempfile

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfbuilder import ModelBuilder
from hfbuilder.testing import make_model


def main() -> None:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="hfbuilder-demo-") as tmp:
        path = make_model("opt", tmp)  # a real OPT checkpoint + tokenizer, saved like any other
        tokenizer = AutoTokenizer.from_pretrained(path)

        base = ModelBuilder(AutoModelForCausalLM, path, tokenizer)
        actor = base.with_dropout(0.0)

        print("plan:", " -> ".join(actor.plan()))
        model, report = actor.build_with_report()
        print()
        print(report.format())
        print()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"built {type(model).__name__}: {n_params:,} parameters, "
              f"vocabulary {model.get_input_embeddings().weight.shape[0]} (len(tokenizer) = {len(tokenizer)}), "
              f"pad_token_id {model.config.pad_token_id}")


if __name__ == "__main__":
    main()
