"""The quick-start demo: make a tiny OPT model on disk, build it through the whole chain,
and print the plan and what each stage did; then the RLHF critic of DeepSpeed-Chat's step 3,
explained before it is built and loaded strictly from a step-2 checkpoint.
Runs in seconds on a CPU; downloads nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import transformers
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

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

        # Step 2 trains a reward model; save it as DeepSpeed-Chat does (rwtransformer.*, v_head.weight).
        reward = ModelBuilder(AutoModel, path, tokenizer).for_phase("reward", num_padding_at_beginning=1).build()
        step2 = os.path.join(tmp, "step2-output")
        shutil.copytree(path, step2)
        save_file({k: v.contiguous() for k, v in reward.state_dict().items()}, os.path.join(step2, "model.safetensors"))

        # Step 3 loads it as the critic: explained first (reads no weights), then built.
        critic = ModelBuilder(AutoModel, step2, tokenizer).for_phase("critic", num_padding_at_beginning=1)
        print("\n--- critic (DeepSpeed-Chat step 3) ---")
        print(critic.explain())
        model, report = critic.build_with_report()
        print()
        print(report.format())
        print(f"\nbuilt {type(model).__name__}; v_head.weight came from: {report.provenance['v_head.weight']}")


if __name__ == "__main__":
    main()
