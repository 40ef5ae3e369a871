"""transformers prefill/decode tokens/s on a checkpoint, llama-bench style (fixed tokens, no sampling).

Usage: python hf_bench.py MODEL_DIR DTYPE(f32|bf16) THREADS REPS TEST...
TEST: ppN (a prompt of N tokens), tgN (N single-token steps), either with @D for D tokens already in
the KV cache (untimed). Prints "TEST median_tokens_per_second" per test, after one warm-up run.
"""
import statistics
import sys
import time
import warnings

import torch
from transformers import AutoModelForCausalLM

warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values' rename, not our concern
path, dtype, threads, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="eager").eval()
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(0)


def context(depth):
    """A KV cache holding `depth` random tokens (None when 0)."""
    if depth == 0:
        return None
    ids = torch.randint(0, vocab, (1, depth), generator=g)
    return model(ids, use_cache=True).past_key_values


def prefill(n, depth):
    past = context(depth)
    ids = torch.randint(0, vocab, (1, n), generator=g)
    t = time.perf_counter()
    model(ids, past_key_values=past, use_cache=True, logits_to_keep=1)
    return n / (time.perf_counter() - t)


def decode(n, depth):
    past = context(depth)
    ids = torch.randint(0, vocab, (n,), generator=g)
    t = time.perf_counter()
    for i in range(n):
        past = model(ids[i].view(1, 1), past_key_values=past, use_cache=True).past_key_values
    return n / (time.perf_counter() - t)


for test in sys.argv[5:]:
    name, _, depth = test.partition("@")
    fn = {"pp": prefill, "tg": decode}[name[:2]]
    n, depth = int(name[2:]), int(depth or 0)
    with torch.inference_mode():
        fn(n, depth)  # warm-up
        xs = [fn(n, depth) for _ in range(reps)]
    print(f"{test} {statistics.median(xs):.2f}", flush=True)
