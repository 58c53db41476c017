"""The gateway's two scans of every reply, against the one regular expression each replaced.

Per request the gateway reads the token counts from the reply's end (`corral.gateway.access.
reply_tokens`, up to 16 KiB); per batch of a stream it asks whether the batch holds the answer's
last line (`corral.gateway.relay._ends_answer`). Both were one regular expression tried at every
byte; under the soak's load a profile of the gateway found them in about 10 % of its samples. Each is
timed here on a typical input beside that expression (the baseline, in the same run), and both
are checked to read the same.

    .venv/bin/python -m bench.scans [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import re
import timeit

from corral.gateway.access import reply_tokens
from corral.gateway.relay import _DONE, _SSE_LAST, _ends_answer

_COUNT_RULE = re.compile(
    rb'(?<!\\)"(prompt_eval_count|eval_count|prompt_tokens|completion_tokens|input_tokens|output_tokens)"'
    rb"\s*:\s*(\d+)"
)


def _tokens_by_rule(tail: bytes) -> tuple[int, int]:
    found = {m.group(1): int(m.group(2)) for m in _COUNT_RULE.finditer(tail)}
    prompt = found.get(b"prompt_eval_count", found.get(b"prompt_tokens", found.get(b"input_tokens", 0)))
    generated = found.get(b"eval_count", found.get(b"completion_tokens", found.get(b"output_tokens", 0)))
    return prompt, generated


def _ends_by_rule(batch: bytes) -> bool:
    return _DONE in batch or _SSE_LAST.search(batch) is not None


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.scans", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=2000, help="calls timed per figure (default 2000)")
    args = p.parse_args()
    line = {"model": "llama3.2", "created_at": "2026-12-07T00:00:00Z", "response": "tok", "done": False}
    lines = b"".join(json.dumps(line).encode() + b"\n" for _ in range(200))
    tail = (lines + b'{"done":true,"prompt_eval_count":12,"eval_count":30}\n')[-16384:]
    batch = lines[:4096]
    assert reply_tokens(tail) == _tokens_by_rule(tail) == (12, 30)
    assert _ends_answer(batch) == _ends_by_rule(batch) is False
    rows = [
        (f"reply_tokens, {len(tail):,} B NDJSON tail", _tokens_by_rule, reply_tokens, tail),
        (f"_ends_answer, {len(batch):,} B NDJSON batch", _ends_by_rule, _ends_answer, batch),
    ]
    print("| scan | expression (µs) | now (µs) | ratio |\n|---|---:|---:|---:|")
    for name, before, now, data in rows:
        a = timeit.timeit(lambda f=before, d=data: f(d), number=args.repeat) / args.repeat * 1e6
        b = timeit.timeit(lambda f=now, d=data: f(d), number=args.repeat) / args.repeat * 1e6
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.1f}x |")


if __name__ == "__main__":
    main()
