"""transformers prefill/decode tokens/s on a checkpoint, llama-bench style (fixed tokens, no sampling).

Usage: python hf_bench.py MODEL_DIR DTYPE(float32|bfloat16) THREADS P N REPS
"""
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

path, dtype, threads, p, n, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(0)
prompt = torch.randint(0, vocab, (1, p), generator=g)


def prefill():
    t = time.perf_counter()
    with torch.inference_mode():
        model(prompt, use_cache=True)
    return p / (time.perf_counter() - t)


def decode():
    ids = torch.randint(0, vocab, (n,), generator=g)
    with torch.inference_mode():
        out = model(ids[:1].view(1, 1), use_cache=True)
        past = out.past_key_values
        t = time.perf_counter()
        for i in range(1, n + 1):
            out = model(ids[i % n].view(1, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return n / (time.perf_counter() - t)


for name, fn in (("pp%d" % p, prefill), ("tg%d" % n, decode)):
    fn()  # warmup
    xs = [fn() for _ in range(reps)]
    print(f"transformers\t{dtype}\t{name}\t{statistics.median(xs):.2f}\t{statistics.mean(xs):.2f}\t{statistics.stdev(xs) if reps > 1 else 0:.2f}")
