"""Load generator for OpenAI-compatible servers (expanse serve, llama.cpp's llama-server): C clients
each send R streamed requests one after another; prints one JSON line with throughput and latency.

  python3 load.py URL --clients C --requests R --max-tokens N [--endpoint completions|chat]
                  [--prompt-words W] [--extra JSON] [--key KEY] [--unique] [--salt TEXT]
  python3 load.py URL --head-of-line LONG --max-tokens N ...

With --head-of-line, the head-of-line case instead: a request of N tokens alone, then the same request
sent 1 s after one of LONG tokens started; prints both times (a serial server makes the second wait).

Standard library only. Time to first token (TTFT) is from sending the request to the first chunk that
carries a token; per-token latency is the gap between consecutive token chunks (both servers stream
one chunk per token). Throughput is all generated tokens over the wall time of the whole run.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def percentile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def token_text(chunk, endpoint):
    """The token text of a stream chunk, or None for chunks that carry no token (role, finish, usage)."""
    choices = chunk.get("choices") or []
    if not choices or choices[0].get("finish_reason"):
        return None
    c = choices[0]
    if endpoint == "chat":
        d = c.get("delta") or {}
        if "role" in d:
            return None
        # A chunk whose text llama-server files under `reasoning_content` is a token too.
        return d.get("content") if "content" in d else d.get("reasoning_content")
    return c.get("text")


def one_request(url, body, endpoint, key):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    t0 = time.perf_counter()
    conn.request("POST", path, json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError("HTTP %d: %s" % (resp.status, resp.read()[:300]))
    stamps = []
    usage = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(str(chunk["error"]))
        if chunk.get("usage"):
            usage = chunk["usage"]
        if token_text(chunk, endpoint) is not None:
            stamps.append(time.perf_counter())
    conn.close()
    return t0, stamps, usage


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--extra", default="{}", help="JSON merged into every request body")
    ap.add_argument("--key", default=None)
    ap.add_argument("--unique", action="store_true", help="start every prompt differently (no prefix reuse)")
    ap.add_argument("--salt", default="", help="text every prompt starts with (a fresh one per run: no server has it cached)")
    ap.add_argument("--label", default="")
    ap.add_argument("--head-of-line", type=int, default=0, metavar="LONG")
    a = ap.parse_args()
    extra = json.loads(a.extra)
    if a.head_of_line:
        return head_of_line(a, extra)
    results, errors = [], []
    lock = threading.Lock()

    def client(c):
        for r in range(a.requests):
            head = (a.salt + " " if a.salt else "") + ("Request %d of client %d." % (r, c) if a.unique else "Request.")
            text = head + " " + " ".join("word%d" % (i % 50) for i in range(a.prompt_words))
            body = {"max_tokens": a.max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            body["messages" if a.endpoint == "chat" else "prompt"] = [{"role": "user", "content": text}] if a.endpoint == "chat" else text
            body.update(extra)
            try:
                out = one_request(a.url, body, a.endpoint, a.key)
                with lock:
                    results.append(out)
            except Exception as e:  # noqa: BLE001 - reported, counted, and the run goes on
                with lock:
                    errors.append(str(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    # Only the first completion_tokens chunks are tokens: a last chunk may carry held-back text.
    results = [(t0, s[:u["completion_tokens"]] if u else s, u) for t0, s, u in results]
    ttft = [(s[0] - t0) * 1e3 for t0, s, _ in results if s]
    gaps = [(b - a_) * 1e3 for _, s, _ in results for a_, b in zip(s, s[1:])]
    rates = [(len(s) - 1) / (s[-1] - s[0]) for _, s, _ in results if len(s) > 2]
    tokens = sum(len(s) for _, s, _ in results)
    print(json.dumps({
        "label": a.label, "clients": a.clients, "requests": len(results), "errors": len(errors),
        "first_error": errors[0] if errors else None, "tokens": tokens, "wall_s": round(wall, 3),
        "throughput_tps": round(tokens / wall, 2),
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "token_ms_p50": percentile(gaps, 50), "token_ms_p99": percentile(gaps, 99),
        "decode_tps_per_request_median": statistics.median(rates) if rates else None,
    }))


def head_of_line(a, extra):
    def body(n, tag):
        # The salt keeps a later round's prompts out of the server's prefix cache (sixteen.sh HOL=).
        head = (a.salt + " " if a.salt else "") + tag
        b = {"max_tokens": n, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
             "prompt": head + " " + " ".join("word%d" % (i % 50) for i in range(a.prompt_words))}
        b.update(extra)
        return b

    def timed(n, tag):
        t0, stamps, usage = one_request(a.url, body(n, tag), "completions", a.key)
        return (stamps[-1] if stamps else time.perf_counter()) - t0, usage["completion_tokens"] if usage else len(stamps)

    alone = statistics.median(timed(a.max_tokens, "Short %d." % i)[0] for i in range(3))
    # The long answer's thread keeps its outcome: an error there must fail the run, not read as a
    # request that delayed nothing.
    long_out = {}

    def long_request():
        try:
            long_out["tokens"] = timed(a.head_of_line, "Long.")[1]
        except Exception as e:  # noqa: BLE001 - re-raised below, after the short request
            long_out["error"] = e
    long_one = threading.Thread(target=long_request)
    long_one.start()
    time.sleep(1.0)
    behind, _ = timed(a.max_tokens, "Short behind.")
    long_one.join()
    if "error" in long_out:
        raise long_out["error"]
    print(json.dumps({"label": a.label, "head_of_line": a.head_of_line, "long_tokens": long_out["tokens"],
                      "short_tokens": a.max_tokens, "short_alone_s": round(alone, 3), "short_behind_long_s": round(behind, 3),
                      "ratio": round(behind / alone, 2)}))


if __name__ == "__main__":
    main()
