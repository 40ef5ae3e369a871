#!/usr/bin/env python3
"""The anchor of gpu-check: PyTorch/transformers decoding a model of expanse's synthetic shape (random
weights, bf16, a static KV cache, eager: no torch.compile), timed as `expanse bench` times its tg
test, so the summary can print expanse / transformers measured on the same machine in the same run.
Eager because generate() compiles a static-cache model afresh for every new cache length: on the
first H200 run (2026-12-04) the compiling anchor did not finish its three generate calls in 120 s.

usage: hf_decode_anchor.py --config PRESET|CONFIG.json [--layers 40] [--device cuda] [-n 128]
                           [--depth 0] [--json OUT]
PRESET names a file of src/presets/ (openchat-3.5-0106). --layers overrides num_hidden_layers (40:
the expanded model's depth; transformers runs every layer, as expanse's `expanded` variant does).
"""
import argparse
import json
import os
import sys
import time

import torch
import transformers
from transformers import MistralConfig, MistralForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))


def load_config(spec: str, layers: int) -> MistralConfig:
    path = spec if os.path.isfile(spec) else os.path.join(HERE, "..", "src", "presets", spec + ".json")
    with open(path) as f:
        raw = json.load(f)
    raw.pop("architectures", None)
    raw.pop("torch_dtype", None)
    if layers:
        raw["num_hidden_layers"] = layers
    return MistralConfig(**raw)


def timed_generate(model, ids, new_tokens: int, device: str) -> float:
    """Seconds for prefill + `new_tokens` greedy tokens (exactly that many: no stop token)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         cache_implementation="static", pad_token_id=0, disable_compile=True)
    if device == "cuda":
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    cfg = load_config(a.config, a.layers)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # Built in bf16 on the device directly: 9B parameters in f32 first would take 36 GB and the time
    # to initialise them twice.
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(a.device):
        model = MistralForCausalLM(cfg).eval()
    load_secs = time.perf_counter() - t0
    prompt = max(a.depth, 1)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device=a.device)
    with torch.inference_mode():
        timed_generate(model, ids, 2, a.device)  # warm-up: kernels, cache allocation
        # Decode alone: (prefill + n tokens) - (prefill + 1 token), as bench times n steps after the prompt.
        one = min(timed_generate(model, ids, 1, a.device) for _ in range(2))
        full = min(timed_generate(model, ids, a.n, a.device) for _ in range(2))
    tps = (a.n - 1) / max(full - one, 1e-9)
    r = {"transformers": transformers.__version__, "mode": "eager", "torch": torch.__version__, "device": a.device, "dtype": "bf16",
         "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "depth": a.depth, "n": a.n,
         "decode_tps": tps, "model_build_secs": load_secs,
         "params": sum(p.numel() for p in model.parameters())}
    if a.device == "cuda":
        r["gpu"] = torch.cuda.get_device_name()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    print(f"transformers {r['transformers']} {r['layers']} layers bf16 static cache, eager, on {a.device}: {tps:.1f} tok/s decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
