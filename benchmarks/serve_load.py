"""Load test of `visionzoo serve` against the first, standard-library server, both started by this
script on loopback, one after the other, in the same run (issue 19's acceptance figures).

    python benchmarks/serve_load.py                  # the full run: about 8 minutes on an idle machine
    python benchmarks/serve_load.py --quick          # shorter phases and fewer requests: about 5 minutes

Phases (every loop is bounded in time and count; traffic goes to 127.0.0.1 only):
  1. throughput: 32 keep-alive clients for 60 s on each server: requests/s, p50, p99, errors
  2. fresh connections: 64 clients, a new connection per request: resets and refusals on each server
  3. idle connections: 300 connections that send nothing; the new server's thread count, and the
     latency of /health while they are open
  4. overload: requests offered at 4x the rate the new server sustained in phase 1: how many get 503,
     how fast, the latency of the accepted ones, and memory against the steady state
  5. memory: the new server's resident memory over 20,000 requests
The payload is a photo as a 35 KB JPEG. The new server runs on the best installed backend (ONNX
Runtime, else OpenVINO, else torch) with dynamic batching; the old one as `visionzoo serve` ran it by
default (torch, one image per call behind a lock), or on --baseline-backend.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, by design
PHOTO = ROOT / "examples" / "images" / "coffee.png"


def payload() -> bytes:
    """A photo as a JPEG of about 35 KB."""
    from PIL import Image

    img = Image.open(PHOTO).convert("RGB")
    for quality in (90, 85, 80, 75, 70, 60, 50):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        if buf.tell() <= 36_000:
            break
    return buf.getvalue()


def best_backend() -> str:
    """ONNX Runtime when installed, else OpenVINO, else torch. For a server's batches ONNX Runtime's
    data-parallel mode (one single-threaded session per core, `OnnxRuntimeRunner`) costs the least CPU
    per image here: 26 requests per CPU-second against OpenVINO's 23 (--quick, this machine)."""
    sys.path.insert(0, str(ROOT / "src"))
    from visionzoo.runtime.backends import Backend, installed_backends

    found = installed_backends()
    for b in (Backend.ONNXRUNTIME, Backend.OPENVINO):
        if b in found:
            return b.value
    return Backend.TORCH.value


# ---- servers ---------------------------------------------------------------------------------------
class ServerProcess:
    def __init__(self, name: str, command: list[str]):
        self.name = name
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=ROOT)
        self.url = ""
        self.lines: list[str] = []
        deadline = time.time() + 300
        while time.time() < deadline:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if not line and self.proc.poll() is not None:
                break
            self.lines.append(line)
            if m := re.search(r"http://[\d.]+:(\d+)", line):
                self.url, self.port = m.group(0), int(m.group(1))
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"{name} did not start:\n{''.join(self.lines[-20:])}")
        # drain its output so that it never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()  # type: ignore[union-attr]

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    @property
    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def threads(self) -> int:
        return self.status("Threads")

    @property
    def rss_mib(self) -> float:
        return self.status("VmRSS") / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---- a small HTTP/1.1 client on asyncio streams ----------------------------------------------------
class Reset(Exception):
    pass


async def send(reader, writer, method: str, path: str, body: bytes = b"", close: bool = False) -> tuple[int, bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
    head += "Content-Type: application/octet-stream\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise Reset("closed")
        status = int(status_line.split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await reader.readexactly(length)
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
        raise Reset(type(e).__name__) from None


@dataclass
class Tally:
    ok: int = 0
    status: dict = field(default_factory=dict)
    resets: int = 0
    latencies: list = field(default_factory=list)  # seconds, 200s only
    refused_latencies: list = field(default_factory=list)  # seconds, 503s

    def add(self, status: int, seconds: float) -> None:
        self.status[status] = self.status.get(status, 0) + 1
        if status == 200:
            self.ok += 1
            self.latencies.append(seconds)
        elif status == 503:
            self.refused_latencies.append(seconds)

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.status.items() if s != 200) + self.resets


def pct(values: list, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def closed_loop(port: int, clients: int, seconds: float, data: bytes, max_requests: int,
                      fresh: bool = False) -> tuple[Tally, float]:
    """`clients` clients, each sending its next request when the last is answered."""
    tally = Tally()
    deadline = time.perf_counter() + seconds
    sent = 0

    async def client() -> None:
        nonlocal sent
        conn = None
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(HOST, port)
                status, _ = await send(*conn, "POST", "/predict?topk=1", data, close=fresh)
                tally.add(status, time.perf_counter() - started)
                if fresh:
                    conn[1].close()
                    conn = None
            except (Reset, OSError):
                tally.resets += 1
                if conn is not None:
                    conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return tally, time.perf_counter() - started


async def open_loop(port: int, rate: float, seconds: float, data: bytes, connections: int) -> Tally:
    """Requests offered at `rate` per second whatever the answers (a pool of keep-alive connections)."""
    tally = Tally()
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(None)

    async def one() -> None:
        conn = await pool.get()
        started = time.perf_counter()
        try:
            if conn is not None:
                try:
                    status, _ = await send(*conn, "POST", "/predict?topk=1", data)
                except Reset:
                    # the server closed this keep-alive connection while it sat idle in the pool
                    # (--keepalive-timeout): reconnect and send again, as HTTP clients do
                    conn[1].close()
                    conn = None
            if conn is None:
                conn = await asyncio.open_connection(HOST, port)
                status, _ = await send(*conn, "POST", "/predict?topk=1", data)
            tally.add(status, time.perf_counter() - started)
        except (Reset, OSError):
            tally.resets += 1
            if conn is not None:
                conn[1].close()
            conn = None
        pool.put_nowait(conn)

    tasks = []
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    return tally


async def idle_connections(server: ServerProcess, count: int, seconds: float) -> dict:
    threads_before = server.threads
    conns = [await asyncio.open_connection(HOST, server.port) for _ in range(count)]
    await asyncio.sleep(0.5)
    threads_open = server.threads
    health = []
    deadline = time.perf_counter() + seconds
    max_threads = threads_open
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        r = await asyncio.open_connection(HOST, server.port)
        status, _ = await send(*r, "GET", "/health", close=True)
        r[1].close()
        health.append(time.perf_counter() - started)
        assert status == 200
        max_threads = max(max_threads, server.threads)
        await asyncio.sleep(0.1)
    for _, w in conns:
        w.close()
    return {"connections": count, "threads_before": threads_before, "threads_with_idle": max_threads,
            "health_ms_p50": 1000 * pct(health, 50), "health_ms_max": 1000 * max(health), "health_checks": len(health)}


def summary(tally: Tally, elapsed: float) -> dict:
    return {"requests_ok": tally.ok, "errors": tally.errors, "resets": tally.resets, "statuses": tally.status,
            "req_per_s": tally.ok / elapsed, "p50_ms": 1000 * (pct(tally.latencies, 50) or 0),
            "p99_ms": 1000 * (pct(tally.latencies, 99) or 0)}


def merge(a: Tally, b: Tally) -> Tally:
    status = dict(a.status)
    for k, v in b.status.items():
        status[k] = status.get(k, 0) + v
    return Tally(a.ok + b.ok, status, a.resets + b.resets, a.latencies + b.latencies,
                 a.refused_latencies + b.refused_latencies)


def ready(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/ready", timeout=10) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def metric(url: str, name: str) -> float | None:
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    m = re.search(rf"^{re.escape(name)} ([\d.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="efficientnet_lite0")
    parser.add_argument("--backend", default=None, help="the new server's backend (default: the best installed)")
    parser.add_argument("--baseline-backend", default="torch", help="the old server's (default: as it ran: torch)")
    parser.add_argument("--quick", action="store_true", help="short phases: about 2 minutes in all")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--memory-requests", type=int, default=None, help="requests of the memory phase "
                        "(default 20,000; --quick 2,000)")
    parser.add_argument("--json", dest="json_file", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    quick = args.quick
    duration = 15.0 if quick else 60.0
    fresh_seconds = 5.0 if quick else 15.0
    memory_requests = args.memory_requests or (2000 if quick else 20_000)
    memory_seconds = 120.0 if quick else 1800.0  # bounded in time too: a busy machine serves far fewer
    backend = args.backend or best_backend()
    data = payload()
    figures: dict = {"model": args.model, "backend": backend, "payload_bytes": len(data), "quick": quick,
                     "clients": args.clients,
                     "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    print(f"{args.model}, payload {len(data):,} bytes JPEG, new server on {backend}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    # both servers listen at once (an idle one costs nothing); the throughput rounds alternate between
    # them, so that a change in the machine's other load falls on both alike
    old = ServerProcess("stdlib server", [sys.executable, str(ROOT / "benchmarks" / "baseline_stdlib_server.py"),
                                          args.model, "--port", "0", "--backend", args.baseline_backend])
    new = None
    try:
        new = ServerProcess("visionzoo serve", [sys.executable, "-m", "visionzoo", "serve", args.model, "--port",
                                                "0", "--backend", backend, "--max-batch", "32", "--max-delay-ms", "5"])
        deadline = time.time() + 600
        while not ready(new.url) and time.time() < deadline:
            time.sleep(1)
        for server in (old, new):  # warm-up
            asyncio.run(closed_loop(server.port, args.clients, 5, data, 300))
        rss_steady_start = new.rss_mib
        rounds = 2 if quick else 4
        tallies: dict = {"old": (Tally(), 0.0), "new": (Tally(), 0.0)}
        cpu = {"old": 0.0, "new": 0.0}
        for _ in range(rounds):
            for name, server in (("old", old), ("new", new)):
                used = server.cpu_seconds
                tally, elapsed = asyncio.run(closed_loop(server.port, args.clients, duration / rounds, data, 10**6))
                cpu[name] += server.cpu_seconds - used
                merged, total = tallies[name]
                tallies[name] = (merge(merged, tally), total + elapsed)
        figures["old_throughput"] = summary(*tallies["old"])
        figures["new_throughput"] = summary(*tallies["new"])
        for name in ("old", "new"):
            # what a request costs, whatever share of the machine the server got: the figure that
            # carries over from a busy machine to an idle one
            figures[f"{name}_throughput"]["cpu_seconds"] = cpu[name]
            figures[f"{name}_throughput"]["req_per_cpu_s"] = figures[f"{name}_throughput"]["requests_ok"] / cpu[name]
        figures["old_backend"] = args.baseline_backend
        figures["new_rss_mib_steady"] = new.rss_mib
        print(f"old: {json.dumps(figures['old_throughput'])}", flush=True)
        print(f"new: {json.dumps(figures['new_throughput'])}", flush=True)
        tally, elapsed = asyncio.run(closed_loop(old.port, 64, fresh_seconds, data, 10**6, fresh=True))
        figures["old_fresh_64"] = summary(tally, elapsed)
        old.stop()
        tally, elapsed = asyncio.run(closed_loop(new.port, 64, fresh_seconds, data, 10**6, fresh=True))
        figures["new_fresh_64"] = summary(tally, elapsed)
        figures["new_idle_300"] = asyncio.run(idle_connections(new, 300, 5.0 if quick else 8.0))
        rate = 4 * figures["new_throughput"]["req_per_s"]
        overload_rss = []
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.wait(0.5):
                overload_rss.append(new.rss_mib)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tally = asyncio.run(open_loop(new.port, rate, 10.0 if quick else 20.0, data, connections=256))
        sampler_stop.set()
        sampler.join()
        figures["new_overload_4x"] = {
            "offered_per_s": rate, **summary(tally, 10.0 if quick else 20.0),
            "refused_503": tally.status.get(503, 0),
            "refused_ms_p50": 1000 * (pct(tally.refused_latencies, 50) or 0),
            "refused_ms_p99": 1000 * (pct(tally.refused_latencies, 99) or 0),
            "rss_mib_max": max(overload_rss, default=new.rss_mib), "rss_mib_steady": figures["new_rss_mib_steady"]}
        time.sleep(2)
        rss_before = new.rss_mib
        tally, elapsed = asyncio.run(closed_loop(new.port, args.clients, memory_seconds, data, memory_requests))
        figures["new_memory"] = {"requests": tally.ok + tally.errors, "errors": tally.errors,
                                 "rss_mib_before": rss_before,
                                 "rss_mib_after": new.rss_mib, "rss_mib_at_warmup": rss_steady_start}
        count = metric(new.url, "visionzoo_batch_size_count") or 0
        total = metric(new.url, "visionzoo_batch_size_sum") or 0
        figures["new_mean_batch"] = total / count if count else None
        figures["new_threads_at_end"] = new.threads
    finally:
        old.stop()
        if new is not None:
            new.stop()
    figures["load_average_at_end"] = os.getloadavg()
    report(figures)
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(figures, indent=2) + "\n")


def report(f: dict) -> None:
    o, n = f["old_throughput"], f["new_throughput"]
    ratio = n["req_per_s"] / o["req_per_s"] if o["req_per_s"] else float("inf")
    idle, over, mem = f["new_idle_300"], f["new_overload_4x"], f["new_memory"]
    mem_change = (mem["rss_mib_after"] - mem["rss_mib_before"]) / mem["rss_mib_before"]
    over_mem = (over["rss_mib_max"] - over["rss_mib_steady"]) / over["rss_mib_steady"]
    cost = (f"per CPU-second: old {o['req_per_cpu_s']:.1f} req, new {n['req_per_cpu_s']:.1f} req "
            f"({n['req_per_cpu_s'] / o['req_per_cpu_s']:.2f}x)")
    lines = [
        f"throughput, {f['clients']} clients: old {o['req_per_s']:.1f} req/s (p50 {o['p50_ms']:.0f} ms, "
        f"p99 {o['p99_ms']:.0f} ms, "
        f"{o['errors']} errors, on {f['old_backend']}); new {n['req_per_s']:.1f} req/s (p50 {n['p50_ms']:.0f} ms, "
        f"p99 {n['p99_ms']:.0f} ms, {n['errors']} errors, on {f['backend']}, mean batch "
        f"{f['new_mean_batch'] or 0:.1f}): {ratio:.2f}x  [want >= 2x, p99 <= 3x p50, 0 errors]; {cost}",
        f"64 clients, fresh connections: old {f['old_fresh_64']['resets']} resets, new {f['new_fresh_64']['resets']} "
        f"resets ({f['new_fresh_64']['requests_ok']} answered)  [want 0 on new]",
        f"300 idle connections: threads {idle['threads_before']} -> {idle['threads_with_idle']}; /health p50 "
        f"{idle['health_ms_p50']:.1f} ms, max {idle['health_ms_max']:.1f} ms over {idle['health_checks']} checks  "
        f"[want bounded, < 100 ms]",
        f"overload at 4x ({over['offered_per_s']:.0f} req/s offered): {over['refused_503']} answered 503 in p50 "
        f"{over['refused_ms_p50']:.1f} ms / p99 {over['refused_ms_p99']:.1f} ms; accepted {over['requests_ok']} with "
        f"p50 {over['p50_ms']:.0f} ms, p99 {over['p99_ms']:.0f} ms; {over['resets']} resets; memory "
        f"{over['rss_mib_steady']:.0f} -> max {over['rss_mib_max']:.0f} MiB ({100 * over_mem:+.1f}%)  "
        f"[want within 20%]",
        f"memory over {mem['requests']:,} requests: {mem['rss_mib_before']:.0f} -> {mem['rss_mib_after']:.0f} MiB "
        f"({100 * mem_change:+.1f}%), {mem['errors']} errors  [want within 10%]",
        f"threads of the new server at the end: {f['new_threads_at_end']}; load average "
        f"{f['load_average_at_start'][0]:.1f} at start, {f['load_average_at_end'][0]:.1f} at end",
    ]
    print("\n".join(lines), flush=True)
    f["summary"] = {"ratio": ratio, "memory_change": mem_change, "overload_memory_change": over_mem}


if __name__ == "__main__":
    main()
