"""Served-verifier scoring throughput: rows per second through a vLLM-compatible server against local scoring.

    python benchmarks/remote.py                                   # 48 rows under SmolLM2-135M-Instruct
    python benchmarks/remote.py --model gemma3-270m --rows 96 --concurrency 8 --request-rows 16

The rows are the shipped preference pairs' prompts with their chosen and rejected answers (real text), cut to
--max-length response tokens. "local" is `score_texts` on this machine (--batch-size rows per forward);
"served" is the same call for a served verifier (`VerifierConfig.url`, cache off), whose requests go over
HTTP on 127.0.0.1 to tests/vllm_server.py, which runs the same model with cme_jax's code in this process
(one request at a time, as one accelerator would; vLLM would also batch concurrent requests together). The
difference between the rows is therefore what the served path adds: request building, JSON both ways,
per-request padding, and the client's threads sharing the CPU with the server. Both sides run in the same
process on the same (possibly shared) CPU: compare the ratio, which comes from one run. Each path is
timed best-of --repeats after one warm-up call (compilation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test server lives in tests/
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_time, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded alias or model directory")
    p.add_argument("--rows", type=int, default=48, help="(prompt, response) rows scored per call")
    p.add_argument("--max-length", type=int, default=64, help="response tokens scored at most")
    p.add_argument("--batch-size", type=int, default=16, help="local rows per forward")
    p.add_argument("--concurrency", type=int, default=8, help="served requests in flight")
    p.add_argument("--request-rows", type=int, default=16, help="served rows per request at most")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import jax
    import numpy as np

    from cme_jax.eval.audit import shipped_pairs
    from cme_jax.scoring import Verifier, VerifierConfig, load_verifier, score_texts
    from cme_jax.sources import load_model
    from tests.vllm_server import VllmLikeServer

    pairs = shipped_pairs()
    texts = [(q.prompt, t) for q in pairs for t in (q.chosen, q.rejected)]
    if not 1 <= args.rows <= len(texts):
        p.error(f"--rows must be in [1, {len(texts)}]: the shipped pairs hold {len(texts)} distinct rows")
    rows = texts[: args.rows]
    prompts, responses = [r[0] for r in rows], [r[1] for r in rows]

    model = load_model(args.model)
    local = Verifier.from_model(VerifierConfig(model=args.model, max_length=args.max_length), model)
    server = VllmLikeServer()
    server.models["bench"] = model
    served_cfg = VerifierConfig(
        model=args.model,
        max_length=args.max_length,
        url=server.url,
        server_model="bench",
        concurrency=args.concurrency,
        request_rows=args.request_rows,
        cache=None,  # every call pays: the cache would answer the repeats
    )
    served = load_verifier(served_cfg)
    try:
        out = {}

        def run(name: str, verifier: Verifier) -> None:
            out[name] = score_texts(verifier, prompts, responses, batch_size=args.batch_size)

        t_local = best_time(lambda: run("local", local), args.repeats)
        t_served = best_time(lambda: run("served", served), args.repeats)
    finally:
        server.close()
    diff = float(np.abs(out["served"].mean - out["local"].mean).max())
    tokens = int(out["local"].count.sum())
    requests = len(server.bodies) // (args.repeats + 1)
    print(
        f"{args.model}: {args.rows} rows, {tokens} response tokens scored, backend {jax.default_backend()}; "
        f"served: {requests} requests of up to {args.request_rows} rows, {args.concurrency} in flight; "
        f"max |served - local| = {diff:.2e}"
    )
    print(
        table(
            ["path", "seconds", "rows/s", "tokens/s", "vs local"],
            [
                ["local", t_local, args.rows / t_local, tokens / t_local, 1.0],
                ["served (HTTP, 127.0.0.1)", t_served, args.rows / t_served, tokens / t_served, t_local / t_served],
            ],
        )
    )


if __name__ == "__main__":
    main()
