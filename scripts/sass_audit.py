#!/usr/bin/env python3
"""Reads `ptxas -v` logs and `cuobjdump -sass` listings of expanse's kernels (scripts/kernel-audit.sh
makes them) and fails when a kernel spills or uses local memory, or when the main loop of a GEMV or
decode-attention kernel keeps fewer than MIN 128-bit global loads in flight.

The in-flight rule, precisely (per SASS function, on the instruction listing):
  * A loop is a backward branch: `BRA target` at address A with target T <= A; its body is every
    instruction at T..A. The main loop is the loop whose body holds the most 128-bit global loads
    (opcodes LDG*.128); ties go to the shorter body.
  * Walking the body in order, an LDG*.128 is *in flight* from its issue until the first later
    instruction that reads or overwrites one of the registers it loads (the scoreboard wait), or
    that takes its address from them (then it was not independent).
  * `before_use`: the number of LDG*.128 issued from the loop head before the first such consuming
    instruction (the question "how many loads are issued before the first dependent FFMA/HFMA2",
    with any consumer counted: a bf16 value is first touched by a shift or PRMT).
  * `in_flight`: the most loads in flight at once, walking the body twice so that loads a
    software-pipelined loop carries across its back edge count too (the maximum over the 2nd walk).
  * An audited kernel (GEMV and decode-attention partial kernels) passes when in_flight >= MIN and
    before_use >= MIN.

usage: sass_audit.py MIN PTXAS_LOG... -- SASS_FILE...
"""

import re
import sys

REG = re.compile(r"(?<![A-Za-z_])R(\d+)(\.64)?")
INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
AUDITED = re.compile(r"^expanse_(gemv_|gemv_silu_mul_|decode_attn_(f32|bf16|f16)_d\d+)")
# Quantized GEMVs of the types whose blocks (18-34 or 210 bytes) leave their fields unaligned: they
# read bytes (gemv_quant.cu), so the 128-bit rule cannot hold; spills and local memory still fail
# them. Q4_K and Q5_K (16-byte aligned blocks) are audited as every GEMV.
UNALIGNED_BLOCKS = re.compile(r"^expanse_gemv_(silu_mul_)?(q8_0|q4_0|q4_1|q5_0|q5_1|q6_k)_")
STORES = ("ST", "STG", "STS", "STL", "RED", "REDG", "SUST", "ST.")


def regs_of(tok_text):
    out = []
    for m in REG.finditer(tok_text):
        n = int(m.group(1))
        out.append(n)
        if m.group(2):
            out.append(n + 1)
    return out


def parse_insn(text):
    """(opcode, dest regs, source regs) of one SASS instruction (predicate guard stripped)."""
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    parts = text.split(None, 1)
    op = parts[0]
    ops = [o.strip() for o in parts[1].split(",")] if len(parts) > 1 else []
    base = op.split(".")[0]
    dest, src = [], []
    if ops and base not in STORES and re.match(r"^R\d+", ops[0]):
        first = int(re.match(r"^R(\d+)", ops[0]).group(1))
        width = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1
        dest = list(range(first, first + width))
        for o in ops[1:]:
            src += regs_of(o)
    else:
        for o in ops:
            src += regs_of(o)
    return op, dest, src


def is_ldg128(op):
    return op.startswith("LDG") and ".128" in op


def parse_sass(path):
    """{function: [(addr, text)]} from a cuobjdump -sass listing."""
    funcs, cur = {}, None
    for line in open(path, encoding="utf-8", errors="replace"):
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = INSN.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def loops(insns):
    out = []
    for addr, text in insns:
        op = re.sub(r"^@!?U?P\w+\s+", "", text).split(None, 1)[0]
        if op.startswith("BRA"):
            m = re.findall(r"0x([0-9a-f]+)", text)
            if m:
                target = int(m[-1], 16)
                if target <= addr:
                    out.append((target, addr))
    return out


def walk(body, passes):
    """(before_use, in_flight) for a loop body (see the module's doc)."""
    pending = []  # [set(regs)]
    before_use, first_use_seen, in_flight = 0, False, 0
    for p in range(passes):
        for _, text in body:
            op, dest, src = parse_insn(text)
            touched = set(src) | set(dest)
            kept = [r for r in pending if not (r & touched)]
            if len(kept) != len(pending):
                first_use_seen = True
            pending = kept
            if is_ldg128(op):
                pending.append(set(dest))
                if p == 0 and not first_use_seen:
                    before_use += 1
            if p == passes - 1:
                in_flight = max(in_flight, len(pending))
    return before_use, in_flight


def main_loop(insns):
    best = None
    for t, a in loops(insns):
        body = [(addr, text) for addr, text in insns if t <= addr <= a]
        n = sum(1 for _, text in body if is_ldg128(parse_insn(text)[0]))
        key = (n, -(a - t))
        if n and (best is None or key > best[0]):
            best = (key, body, t, a)
    return best


def parse_ptxas(paths):
    """{function: {regs, stack, spill_st, spill_ld, smem}} from ptxas -v logs."""
    info, cur = {}, None
    for path in paths:
        for line in open(path, encoding="utf-8", errors="replace"):
            m = re.search(r"Function properties for (\S+)", line) or re.search(r"Compiling entry function '([^']+)'", line)
            if m:
                cur = info.setdefault(m.group(1), {"regs": 0, "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0})
                continue
            if cur is None:
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
            m = re.search(r"Used (\d+) registers", line)
            if m:
                cur["regs"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            if m:
                cur["smem"] = int(m.group(1))
    return info


def main(argv):
    minimum = int(argv[1])
    sep = argv.index("--")
    ptx = parse_ptxas(argv[2:sep])
    funcs = {}
    for path in argv[sep + 1:]:
        funcs.update(parse_sass(path))
    failures = []
    print(f"{'kernel':<40} {'regs':>4} {'smem':>5} {'stack':>5} {'spill':>5} {'local':>5}  {'ldg128':>6} {'before_use':>10} {'in_flight':>9}  verdict")
    for name in sorted(funcs):
        insns = funcs[name]
        p = ptx.get(name, {"regs": -1, "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0})
        local = sum(1 for _, t in insns if re.match(r"^(@!?P\w+\s+)?(LDL|STL)", t))
        problems = []
        if p["spill_st"] or p["spill_ld"] or p["stack"]:
            problems.append(f"spills ({p['spill_st']} B stored, {p['spill_ld']} B loaded, {p['stack']} B stack)")
        if local:
            problems.append(f"{local} local-memory instructions")
        ldg, before, flight = "-", "-", "-"
        if AUDITED.match(name) and not UNALIGNED_BLOCKS.match(name):
            best = main_loop(insns)
            if best is None:
                problems.append("no loop with 128-bit global loads")
            else:
                (n, _), body, t, a = best
                before, flight = walk(body, 2)
                ldg = n
                short = [f"{before} LDG.128 issued before the first use" for _ in [0] if before < minimum]
                short += [f"at most {flight} in flight" for _ in [0] if flight < minimum]
                if short:
                    problems.append(f"main loop 0x{t:04x}-0x{a:04x}: {', '.join(short)} (< {minimum})")
        verdict = "ok" if not problems else "FAIL: " + "; ".join(problems)
        print(f"{name:<40} {p['regs']:>4} {p['smem']:>5} {p['stack']:>5} {p['spill_st'] + p['spill_ld']:>5} {local:>5}  {ldg:>6} {before:>10} {flight:>9}  {verdict}")
        if problems:
            failures.append(name)
    if not funcs:
        print("no SASS functions found")
        return 1
    print(f"{len(funcs)} kernels, {len(failures)} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
