"""Critic load: DeepSpeed-Chat's algorithm against hfbuilder's checkpoint stage, side by side.

Makes an OPT-350m-shaped reward model (fp16, 50k vocabulary, random weights) in a
temporary directory, saved the way DeepSpeed-Chat's step 2 saves it (the
RewardModel's state dict as ``pytorch_model.bin``; also as ``model.safetensors``),
then loads it in fresh subprocesses, alternating:

- ``dschat``: ``AutoModel.from_config`` (full init), resize, wrap in a RewardModel,
  ``torch.load``, ``load_state_dict`` (plain transformers/torch calls);
- ``hfbuilder``: ``ModelBuilder(AutoModel, path, tok).with_head("reward").with_checkpoint()``
  (reads model.safetensors);
- ``hfbuilder-bin``: the same, pointed at pytorch_model.bin.

torch, transformers and the OPT modeling module are imported before timing starts,
in every mode. Peak RSS is the growth of the peak resident set (VmHWM, reset just
before the load) over the RSS at that moment, reported after the load and again after
every weight has been read once (hfbuilder's weights are memory-mapped, so their pages become resident
when first touched; they are clean page cache, shared between processes that load the same file, which
the "private" column, the growth of RssAnon, leaves out).

Run: ``python benchmarks/critic_load.py [--repeats 5]``. It prints medians and ratios;
it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODES = ("dschat", "hfbuilder", "hfbuilder-bin")


def opt_350m_config(vocab_size: int):
    from transformers import OPTConfig

    from hfbuilder.testing import BOS_ID, EOS_ID, PAD_ID

    return OPTConfig(
        vocab_size=vocab_size, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
        word_embed_proj_dim=512, max_position_embeddings=2048, do_layer_norm_before=False,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, dtype="float16",
    )  # fmt: skip


def make_checkpoint(out: str) -> None:
    """A step-2 output directory: config, tokenizer, and the reward model's weights in both formats."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel

    from hfbuilder import ModelBuilder
    from hfbuilder.testing import make_tokenizer

    tok = make_tokenizer(n_words=50261, path=out)  # len 50265, like OPT's tokenizer
    opt_350m_config(8 * -(-len(tok) // 8)).save_pretrained(out)
    torch.manual_seed(0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialized": that is the point here
        model = ModelBuilder(AutoModel, out, tok).with_head("reward", num_padding_at_beginning=1).deferred_weights().build()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out, "pytorch_model.bin"))
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(os.path.join(out, "config.json"))


# -- child: one load in a fresh process ---------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so imports and tokenizer loading do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_mib() -> float:
    peak = _status_mib("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


def _dschat_load(path: str, tok):
    """DeepSpeed-Chat's create_critic_model(rlhf_training=True), with plain transformers/torch calls."""
    import math

    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModel

    class RewardModel(nn.Module):  # the parts of DeepSpeed-Chat's class that loading touches
        def __init__(self, base, tokenizer, num_padding_at_beginning=0):
            super().__init__()
            self.config = base.config
            self.num_padding_at_beginning = num_padding_at_beginning
            self.v_head = nn.Linear(self.config.word_embed_proj_dim, 1, bias=False)
            self.rwtransformer = base
            self.PAD_ID = tokenizer.pad_token_id

    config = AutoConfig.from_pretrained(path)
    model = AutoModel.from_config(config)
    model.config.end_token_id = tok.eos_token_id
    model.config.pad_token_id = model.config.eos_token_id
    model.resize_token_embeddings(int(8 * math.ceil(len(tok) / 8.0)))
    critic = RewardModel(model, tok, num_padding_at_beginning=1)
    state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu")
    critic.load_state_dict(state, strict=False)  # DeepSpeed-Chat's load_state_dict_into_model is non-strict
    return critic


def _hfbuilder_load(path: str, tok, checkpoint: str | None):
    from transformers import AutoModel

    from hfbuilder import ModelBuilder

    builder = ModelBuilder(AutoModel, path, tok).with_head("reward", num_padding_at_beginning=1)
    return builder.with_checkpoint(checkpoint).build()


def child(mode: str, path: str) -> None:
    import warnings

    import torch
    import transformers.models.opt.modeling_opt  # noqa: F401  (imported before timing, in every mode)
    from transformers import AutoTokenizer

    import hfbuilder.plugins  # noqa: F401

    warnings.simplefilter("ignore")
    tok = AutoTokenizer.from_pretrained(path)
    _reset_peak()
    rss_before = _rss_mib()
    anon_before = _status_mib("RssAnon") or 0.0
    start = time.perf_counter()
    if mode == "dschat":
        model = _dschat_load(path, tok)
    elif mode == "hfbuilder":
        model = _hfbuilder_load(path, tok, None)
    else:
        model = _hfbuilder_load(path, tok, os.path.join(path, "pytorch_model.bin"))
    seconds = time.perf_counter() - start
    peak_load = _peak_mib()
    checksum = 0.0
    with torch.no_grad():  # read every weight once, in small chunks; also a checksum that must agree across modes
        for p in model.parameters():
            for chunk in p.detach().reshape(-1).split(1 << 18):
                checksum += float(chunk.sum(dtype=torch.float64))
    print(json.dumps({
        "mode": mode, "seconds": seconds, "rss_before": rss_before,
        "peak_load": peak_load - rss_before, "peak_touched": _peak_mib() - rss_before,
        "anon_touched": (_status_mib("RssAnon") or 0.0) - anon_before,
        "dtype": str(model.v_head.weight.dtype), "checksum": checksum,
    }))  # fmt: skip


# -- parent ------------------------------------------------------------------------------


def run(path: str, repeats: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    env = {**os.environ, "HFBUILDER_DISABLE_PLUGIN_AUTOLOAD": "1", "TOKENIZERS_PARALLELISM": "false"}
    for i in range(repeats):
        for mode in MODES if i % 2 == 0 else reversed(MODES):  # alternate, so drift hits every mode alike
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, path], capture_output=True, text=True, env=env, check=False
            )
            if proc.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  run {i + 1}/{repeats} {mode:<14} {results[mode][-1]['seconds']:.3f} s", flush=True)
    return results


def report(results: dict[str, list[dict]]) -> None:
    keys = ("seconds", "peak_load", "peak_touched", "anon_touched")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in results.items()}
    print(f"\n{'mode':<15}{'median s':>10}{'peak RSS +MiB: load':>21}{'all weights read':>18}"
          f"{'of it private':>15}  v_head dtype")  # fmt: skip
    for mode in MODES:
        m = med[mode]
        print(f"{mode:<15}{m['seconds']:>10.3f}{m['peak_load']:>21.0f}{m['peak_touched']:>18.0f}"
              f"{m['anon_touched']:>15.0f}  {results[mode][0]['dtype']}")  # fmt: skip
    base = med["dschat"]
    for mode in MODES[1:]:
        m = med[mode]
        print(
            f"\n{mode} vs DeepSpeed-Chat: {base['seconds'] / m['seconds']:.1f}x faster (goal >= 20x); "
            f"peak RSS {m['peak_load'] / base['peak_load']:.2f}x at load (goal <= 0.5x), "
            f"{m['peak_touched'] / base['peak_touched']:.2f}x once every weight was read "
            f"(private memory {m['anon_touched'] / max(base['anon_touched'], 1e-9):.2f}x: the rest is clean, shared "
            "page cache of the checkpoint file)"
        )
    sums = {mode: results[mode][0]["checksum"] for mode in MODES}
    agree = max(sums.values()) - min(sums.values()) <= 1e-6 * max(1.0, abs(sums["dschat"]))
    print(f"\nweights identical across modes (checksum): {'yes' if agree else 'NO: ' + str(sums)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", help="reuse (or create) the checkpoint here instead of a temp dir")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="critic-load-") as tmp:
        path = args.dir or tmp
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            os.makedirs(path, exist_ok=True)
            start = time.perf_counter()
            make_checkpoint(path)
            print(f"made an OPT-350m-shaped fp16 reward-model checkpoint in {path} ({time.perf_counter() - start:.1f} s)")
        report(run(path, args.repeats))


if __name__ == "__main__":
    main()
