"""Soak test (issue 15): mixed good and hostile traffic against a local server for N minutes.

    python bench/soak.py --minutes 10 [--server tiny|cli] [--policy tokencake] [--port 8310]

``--server tiny`` (default) serves a tiny random-weight model (fast on CPU: this measures the
server, not the model); ``--server cli`` runs ``tokencake serve`` on the default model. The
server runs in a child process so its memory is measured alone.

Good traffic: completions (plain and streamed) with Tokencake metadata whose agent types and
tool kinds are fresh 200-character strings (so per-type caches churn), each followed by its
``stall_started`` / ``stall_finished`` events; some streams are dropped mid-way by the client.
Hostile traffic: out-of-range metadata (1e308, 10**400, subnormal, NaN), over-long strings,
JSON nested 1,000 deep, undecodable gzip, wrong content types, a lifecycle id with a newline,
events with absurd durations, prompts longer than any context, slowloris and idle sockets.

Printed at the end (and as JSON with ``--out``): good requests served and lost (a good request
is lost unless it got 200 and every token it asked for), 5xx answers to anything, hostile
requests answered 4xx, KV blocks still owned once idle (leaked), and the server's RSS growth
between the end of warm-up and the end of the run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

TINY_SERVER = r"""
import sys
from tokencake.async_engine import AsyncEngine
from tokencake.config import EngineConfig
from tokencake.engine import LLMEngine
from tokencake.models.config import tiny_config
from tokencake.models.tokenizer import Tokenizer
from tokencake.models.weights import random_params
from tokencake.server import BackgroundServer
import signal, threading
cfg = tiny_config()
engine = AsyncEngine(LLMEngine(
    EngineConfig(num_pages=256, page_size=16, max_model_len=256, max_num_seqs=16,
                 max_num_batched_tokens=128, max_prefill_chunk=64, warmup=True,
                 policy=sys.argv[2]),
    model_config=cfg, params=random_params(cfg, 0), tokenizer=Tokenizer.byte_level_for_tests()))
server = BackgroundServer(engine, port=int(sys.argv[1]))
print("ready", flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
server.stop()
engine.shutdown()
"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, host: str, port: int, max_tokens: int = 8) -> None:
        self.host, self.port, self.max_tokens = host, port, max_tokens
        self.stats: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.fivexx: list[str] = []

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def _req(self, method: str, path: str, body: bytes | None, headers: dict[str, str],
             timeout: float = 600.0) -> tuple[int, bytes]:  # fmt: skip
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
            with self.lock:
                self.statuses[r.status] += 1
                if r.status >= 500:
                    self.fivexx.append(f"{method} {path} {r.status} {data[:200]!r}")
            return r.status, data
        finally:
            c.close()

    def post(self, path: str, body: Any, raw: bytes | None = None, **headers: str):
        h = {"Content-Type": "application/json", **headers}
        return self._req("POST", path, raw if raw is not None else json.dumps(body).encode(), h)

    # ---- good traffic -----------------------------------------------------------------------
    def good(self, rng: random.Random) -> None:
        lid = "tc-" + uuid.uuid4().hex
        agent = "agent-" + "".join(rng.choices("abcdefghij", k=200))  # a fresh type each time
        body = {"prompt": f"step {rng.randrange(10**6)} of the plan",
                "max_tokens": self.max_tokens, "ignore_eos": True,
                "tokencake": {"lifecycle_id": lid, "agent_type": agent, "depth": rng.randrange(5),
                              "importance": rng.random() * 5, "offload_eligible": True,
                              "reusable_prefix": True}}  # fmt: skip
        try:
            if rng.random() < 0.5:
                status, data = self.post("/v1/completions", body)
                ok = status == 200 and len(_tokens(data)) == self.max_tokens
            else:
                ok = self._stream_ok(body, drop=rng.random() < 0.1)
                if ok is None:  # dropped on purpose: not a good request
                    self.count("dropped_streams")
                    return
        except OSError as exc:
            ok = False
            self.count(f"good_error_{type(exc).__name__}")
        self.count("good_served" if ok else "good_lost")
        if ok:
            kind = "tool-" + "".join(rng.choices("klmnop", k=200))
            for ev in ({"event": "stall_started", "lifecycle_id": lid, "kind": kind,
                        "estimated_duration_s": rng.choice([0.05, 0.5, 3.0])},
                       {"event": "stall_finished", "lifecycle_id": lid}):  # fmt: skip
                status, _ = self.post("/v1/tokencake/events", ev)
                self.count("good_events_ok" if status == 200 else "good_events_bad")

    def _stream_ok(self, body: dict[str, Any], drop: bool) -> bool | None:
        c = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            c.request("POST", "/v1/completions", json.dumps({**body, "stream": True}).encode(),
                      {"Content-Type": "application/json"})  # fmt: skip
            r = c.getresponse()
            with self.lock:
                self.statuses[r.status] += 1
            if r.status != 200:
                return False
            if drop:
                r.readline()
                return None  # closing the connection aborts the request server-side
            text, done = 0, False
            for line in iter(r.readline, b""):
                line = line.strip()
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: "):
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        return False
                    text += sum(1 for ch in msg.get("choices", []) if ch.get("text") is not None)
            return done and text >= 1
        finally:
            c.close()

    # ---- hostile traffic ----------------------------------------------------------------------
    def hostile(self, rng: random.Random) -> None:
        lid = "tc-" + uuid.uuid4().hex
        base = {"prompt": "x", "max_tokens": 2}
        choice = rng.randrange(14)
        if choice < 6:
            md = rng.choice([{"importance": 1e308}, {"memory_weight": 1e308},
                             {"similarity": 5e-324}, {"depth": 10**400},
                             {"agent_type": "poisontype", "depth": 9 * 10**306},
                             {"agent_type": "y" * 5000}, {"join_group": "z" * 300},
                             {"application_elapsed_s": float("nan")}])  # fmt: skip
            raw = json.dumps({**base, "tokencake": {"lifecycle_id": lid, **md}}).encode()
            status, _ = self.post("/v1/completions", None, raw=raw)
        elif choice == 6:
            raw = b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}"
            status, _ = self.post("/v1/completions", None, raw=raw)
        elif choice == 7:
            status, _ = self.post("/v1/completions", None, raw=b"not gzip at all",
                                  **{"Content-Encoding": "gzip"})  # fmt: skip
        elif choice == 8:
            raw = json.dumps(base).encode()
            status, _ = self._req("POST", "/v1/completions", raw, {"Content-Type": "text/plain"})
        elif choice == 9:
            raw = json.dumps({**base, "temperature": 10**400, "top_p": 10**400}).encode()
            status, _ = self.post("/v1/completions", None, raw=raw)
        elif choice == 10:
            status, _ = self.post(
                "/v1/completions", {**base, "tokencake": {"lifecycle_id": lid + "\n"}}
            )
        elif choice == 11:
            raw = json.dumps({"event": "stall_started", "lifecycle_id": lid,
                              "estimated_duration_s": 10**400, "kind": "k"}).encode()  # fmt: skip
            status, _ = self.post("/v1/tokencake/events", None, raw=raw)
        elif choice == 12:
            status, _ = self.post("/v1/completions", {**base, "prompt": "w " * 400_000})
        else:
            status = self._slowloris(rng)
        self.count("hostile_4xx" if 400 <= status < 500 else f"hostile_status_{status}")

    def _slowloris(self, rng: random.Random) -> int:
        """Half a request (or nothing), held until the server hangs up; 408 stands for 'closed'."""
        s = socket.create_connection((self.host, self.port))
        try:
            if rng.random() < 0.5:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(60)
            while s.recv(4096):
                pass
            return 408
        except TimeoutError:
            return 0  # never closed: counted as a failure of hygiene
        finally:
            s.close()

    def metrics(self) -> dict[str, float]:
        _, data = self._req("GET", "/metrics", None, {})
        out = {}
        for line in data.decode().splitlines():
            if line.startswith("tokencake_") and " " in line and "{" not in line:
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out


def _tokens(data: bytes) -> list[int]:
    body = json.loads(data)
    usage = body.get("usage", {})
    return [0] * int(usage.get("completion_tokens", 0))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--server", choices=["tiny", "cli"], default="tiny")
    ap.add_argument("--policy", default="tokencake")
    ap.add_argument("--port", type=int, default=8310)
    ap.add_argument("--good-workers", type=int, default=6)
    ap.add_argument("--hostile-workers", type=int, default=4)
    ap.add_argument("--warmup-fraction", type=float, default=0.2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.server == "tiny":
        cmd = [sys.executable, "-c", TINY_SERVER, str(args.port), args.policy]
    else:
        cmd = [sys.executable, "-m", "tokencake.cli", "serve", "--port", str(args.port),
               "--policy", args.policy, "--header-timeout", "5", "--keepalive-timeout", "5"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    soak = Soak("127.0.0.1", args.port)
    try:
        deadline = time.monotonic() + 600
        while True:  # wait for the port
            try:
                socket.create_connection(("127.0.0.1", args.port), timeout=1).close()
                if soak._req("GET", "/health", None, {})[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.5)
        start = time.monotonic()
        end = start + args.minutes * 60
        warm_at = start + args.warmup_fraction * args.minutes * 60
        rss = {"start": rss_mib(proc.pid)}
        stop = threading.Event()

        def worker(fn, seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                try:
                    fn(rng)
                except Exception as exc:  # a client-side surprise is reported, not fatal
                    soak.count(f"client_error_{type(exc).__name__}")

        threads = [threading.Thread(target=worker, args=(soak.good, i), daemon=True)
                   for i in range(args.good_workers)]  # fmt: skip
        threads += [threading.Thread(target=worker, args=(soak.hostile, 1000 + i), daemon=True)
                    for i in range(args.hostile_workers)]  # fmt: skip
        for t in threads:
            t.start()
        while time.monotonic() < end:
            if "warm" not in rss and time.monotonic() >= warm_at:
                rss["warm"] = rss_mib(proc.pid)
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(90)
        rss["end_of_traffic"] = rss_mib(proc.pid)
        # Leaks: once idle (lifecycles finished, keep TTLs and grace periods run out), no KV
        # block may still be owned by anything.
        leak_deadline = time.monotonic() + 120
        while True:
            m = soak.metrics()
            if (
                m.get("tokencake_kv_blocks_used", 1) == 0
                and m.get("tokencake_requests_in_flight", 1) == 0
            ) or time.monotonic() > leak_deadline:
                break
            time.sleep(2)
        rss["idle"] = rss_mib(proc.pid)
        result = {
            "minutes": args.minutes, "server": args.server, "policy": args.policy,
            "good_served": soak.stats["good_served"], "good_lost": soak.stats["good_lost"],
            "dropped_streams": soak.stats["dropped_streams"],
            "good_events_ok": soak.stats["good_events_ok"],
            "good_events_bad": soak.stats["good_events_bad"],
            "hostile_4xx": soak.stats["hostile_4xx"],
            "hostile_other": {k: v for k, v in soak.stats.items() if k.startswith("hostile_status")},
            "responses_5xx": sum(v for k, v in soak.statuses.items() if k >= 500),
            "first_5xx": soak.fivexx[:5],
            "client_errors": {k: v for k, v in soak.stats.items() if k.startswith(("client_", "good_error"))},
            "blocks_leaked": m.get("tokencake_kv_blocks_used"),
            "in_flight_at_end": m.get("tokencake_requests_in_flight"),
            "rss_mib": {k: round(v, 1) for k, v in rss.items()},
            "rss_growth_after_warmup_mib": round(rss["idle"] - rss.get("warm", rss["start"]), 1),
            "statuses": dict(sorted(soak.statuses.items())),
        }  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    bad = result["good_lost"] or result["responses_5xx"] or result["blocks_leaked"]
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    raise SystemExit(main())
