"""Exports a trained mr1 agent as an HF checkpoint folder, to serve with transformers or vLLM.

    python experiments/export_hf.py --checkpoint=runs/grpo_answer/best --out=exports/answer

``--checkpoint`` is an RL run's ``<workdir>/best`` or ``<workdir>/checkpoints`` (latest step,
or ``--step``); the run's ``config.json`` beside it names the base model, tokenizer and LoRA
settings, and LoRA adapters are merged into the exported weights. Without ``--checkpoint``,
``--model`` alone exports a base model (any ``load_policy`` name / GGUF / HF folder).

The folder (see :mod:`mr1.models.export`): ``config.json`` (``LlamaForCausalLM`` /
``Qwen2ForCausalLM``), ``model.safetensors`` (shards past ``--max_shard_gb``),
tokenizer files with the chat template, ``generation_config.json``. Serve it with
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` or ``vllm serve OUT``; mr1 reads it
back with ``load_policy(OUT)``.
"""

from __future__ import annotations

import json

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "RL run checkpoint dir (<run>/best)")
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_MODEL = flags.DEFINE_string("model", "", "base model (default: the run's)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'' | embedded | GGUF (default: the run's)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "dtype of the exported weights")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "largest safetensors shard (GiB)")


def main(argv):
    del argv
    from mr1.models.export import export_policy
    from mr1.models.trained import load_base_policy, load_trained_policy

    if _CHECKPOINT.value:
        policy, run = load_trained_policy(_CHECKPOINT.value, model=_MODEL.value or None,
                                          tokenizer=_TOKENIZER.value, step=_STEP.value)
        lora = int((run.get("lora") or {}).get("rank", 0) or 0)
    elif _MODEL.value:
        policy, lora = load_base_policy(_MODEL.value, _TOKENIZER.value or ""), 0
    else:
        raise app.UsageError("give --checkpoint (an RL run's <workdir>/best) or --model")
    if policy.tokenizer is None:
        print("note: this model has no tokenizer; the folder gets none (pass --tokenizer)")
    out = export_policy(policy, _OUT.value, dtype=_DTYPE.value,
                        max_shard_bytes=int(_SHARD_GB.value * 2 ** 30))
    print(json.dumps({"out": str(out), "model": policy.config.name,
                      "architecture": json.loads((out / "config.json").read_text())
                      ["architectures"][0], "lora_rank_merged": lora,
                      "files": sorted(p.name for p in out.iterdir())}))


if __name__ == "__main__":
    app.run(main)
