"""Reference merges from mergekit for Tessera's merge tests.

Writes tests/fixtures/mergekit/: four tiny Llama-shaped checkpoints (a base
and three fine-tunes of it, random weights from a fixed seed) and, for each
merge method, the tensors mergekit produces from them. The Rust test
`merge::mergekit_fixtures_match` merges the same checkpoints with Tessera
(on the CPU and through wgpu) and compares, so CI needs neither Python nor
mergekit. Re-run after changing a method or this script:

    python -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit==0.1.5 torch
    /tmp/mk/bin/python scripts/mergekit-fixtures.py

Each case is (name, mergekit config, Tessera `tessera merge` arguments); the
Rust test reads the Tessera side from cases.json. ExPO is not a mergekit
method: it is checked against mergekit's task arithmetic with the source
as base and weight 1 + alpha, which is its definition. DARE's drops are
random and mergekit draws them from torch's generator, so DARE and
DARE-TIES are compared at density 1 (the rescale-free path, which still
exercises sign election without normalisation); their drop statistics are
unit-tested in Rust.
"""

import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "mergekit")
VOCAB, HIDDEN, INTER, LAYERS = 64, 16, 32, 2

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def shapes():
    s = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            s[p + f"self_attn.{n}.weight"] = (HIDDEN, HIDDEN)
        s[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        s[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        s[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        s[p + "input_layernorm.weight"] = (HIDDEN,)
        s[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    return s


def write_model(name, tensors):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=1)
    # The merge copies the first model's tokenizer files; these checkpoints
    # are never run, so placeholders do.
    for t in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(d, t), "w") as f:
            f.write("{}\n")
    return d


def main():
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    shutil.rmtree(OUT, ignore_errors=True)
    g = torch.Generator().manual_seed(20261123)
    base = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes().items()}
    # Fine-tunes: shared drift plus their own, so deltas partly agree and
    # partly conflict in sign (what TIES's election is for).
    shared = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in base.items()}
    models = {}
    for i, scale in enumerate((1.0, -0.5, 0.7), start=1):
        models[f"m{i}"] = {
            k: v + scale * shared[k] + torch.randn(v.shape, generator=g) * 0.02 for k, v in base.items()
        }
    paths = {"base": write_model("base", base)}
    for n, t in models.items():
        paths[n] = write_model(n, t)

    def entry(m, **params):
        return {"model": paths[m], "parameters": params}

    cases = [
        ("linear", {"merge_method": "linear", "models": [entry("m1", weight=1.0), entry("m2", weight=2.0), entry("m3", weight=0.5)]},
         {"method": "linear", "models": ["m1", "m2", "m3"], "weights": [1.0, 2.0, 0.5]}),
        ("task_arithmetic", {"merge_method": "task_arithmetic", "base_model": paths["base"],
                             "models": [entry("m1", weight=1.0), entry("m2", weight=0.5), entry("m3", weight=-0.3)],
                             "parameters": {"lambda": 0.8}},
         {"method": "task_arithmetic", "models": ["m1", "m2", "m3"], "base": "base", "weights": [1.0, 0.5, -0.3], "lambda": 0.8}),
        ("ties", {"merge_method": "ties", "base_model": paths["base"],
                  "models": [entry("m1", weight=1.0, density=0.5), entry("m2", weight=0.7, density=0.5), entry("m3", weight=0.4, density=0.5)]},
         {"method": "ties", "density": 0.5, "models": ["m1", "m2", "m3"], "base": "base", "weights": [1.0, 0.7, 0.4]}),
        ("ties_lambda", {"merge_method": "ties", "base_model": paths["base"],
                         "models": [entry("m1", weight=1.0, density=0.25), entry("m3", weight=1.0, density=0.25)],
                         "parameters": {"lambda": 1.5}},
         {"method": "ties", "density": 0.25, "models": ["m1", "m3"], "base": "base", "weights": [1.0, 1.0], "lambda": 1.5}),
        ("dare_ties", {"merge_method": "dare_ties", "base_model": paths["base"],
                       "models": [entry("m1", weight=1.0, density=1.0), entry("m2", weight=0.6, density=1.0), entry("m3", weight=0.9, density=1.0)]},
         {"method": "dare_ties", "density": 1.0, "models": ["m1", "m2", "m3"], "base": "base", "weights": [1.0, 0.6, 0.9]}),
        ("dare_linear", {"merge_method": "dare_linear", "base_model": paths["base"],
                         "models": [entry("m1", weight=0.5, density=1.0), entry("m2", weight=0.5, density=1.0)]},
         {"method": "dare", "density": 1.0, "models": ["m1", "m2"], "base": "base", "weights": [0.5, 0.5]}),
        ("slerp", {"merge_method": "slerp", "base_model": paths["m1"], "models": [{"model": paths["m1"]}, {"model": paths["m2"]}],
                   "parameters": {"t": 0.3}},
         {"method": "slerp", "t": 0.3, "models": ["m1", "m2"]}),
        ("expo", {"merge_method": "task_arithmetic", "base_model": paths["m1"], "models": [entry("m3", weight=1.5)]},
         {"method": "expo", "alpha": 0.5, "models": ["m3"], "base": "m1"}),
    ]
    expected = os.path.join(OUT, "expected")
    os.makedirs(expected)
    for name, mk, ours in cases:
        mk = dict(mk, dtype="float32", out_dtype="float32")
        with tempfile.TemporaryDirectory() as tmp:
            run_merge(MergeConfiguration.model_validate(mk), tmp, MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
            merged = {}
            for f in sorted(os.listdir(tmp)):
                if f.endswith(".safetensors"):
                    merged.update(load_file(os.path.join(tmp, f)))
        missing = set(base) - set(merged)
        if missing:
            sys.exit(f"{name}: mergekit wrote no {sorted(missing)}")
        save_file({k: merged[k].float().contiguous() for k in base}, os.path.join(expected, f"{name}.safetensors"))
        print(f"{name}: {len(merged)} tensors")
    # Paths in the cases are folder names under OUT.
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump([dict(ours, name=name) for name, _, ours in cases], f, indent=1)
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            "Made by `scripts/mergekit-fixtures.py` with mergekit 0.1.5 and torch "
            f"{torch.__version__.split('+')[0]}: four tiny random Llama-shaped checkpoints "
            "(`base`, `m1`-`m3`) and mergekit's merge of them for each case in "
            "`cases.json` (`expected/`). Read by tests/all/merge.rs.\n"
        )


if __name__ == "__main__":
    main()
