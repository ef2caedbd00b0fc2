"""Agent syncs against `keyseal server` at 1,000 and 100,000 registration entries (10 per agent): what one sync
costs must not grow with the total. Target: p50 latency and server CPU per sync at 100,000 entries at most 1.5x
those at 1,000; one server core sustains at least 10,000 agents syncing every 5 s at 100,000 entries.

How: the entries are written through the bulk path (`keyseal entry create --from-file`, timed: the bulk create
rate). `keyseal server` runs in a child process (wrapped custody, local KEK, info logs). A sample of simulated
agents, spread over the whole agent name space, join with real join tokens (so each holds a real agent X.509-SVID)
and sync over HTTPS with mutual TLS through keyseal's own agent client (`keyseal.agent.client.ServerClient`, a
kept-alive connection per agent, as the agent keeps one). Rows: the first sync of an agent (`{}`: entries and
bundle), and the steady state (`{"revision": ...}` when nothing changed: neither is sent). Server CPU per sync is
the child's CPU time (from /proc) over the syncs answered; agents per core = 5 s / CPU per sync. RSS is the
child's VmRSS. The 1,000 and 100,000 figures come from the same server process (the second batch is written while
it runs), so both rows share one interpreter and one cache state.

With --kubernetes the same is done against the Kubernetes store on the test harness's API peer (kmock with the
watch, bookmarks and resourceVersion the harness adds, in this process), which exercises the server's informer:
the entries are listed once at the server's first sync and watched after that. It also reports how long a new
entry takes to reach the agent's sync answer through the watch. The peer is far slower than an API server at
bulk writes (one Python HTTP request per object), hence the default sizes there (1,000 and 10,000).

Usage: python benchmarks/agent_sync.py [--sizes 1000,100000] [--agents 200] [--seconds 5] [--threads 4]
                                       [--kubernetes [--kube-sizes 1000,10000]]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.harness.kube_api: the Kubernetes API peer
sys.path.insert(0, str(ROOT / "src"))

TD = "example.org"
PER_AGENT = 10


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_server(config: dict[str, Any], work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    import yaml

    path = work / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "keyseal", "server", "--config", str(path)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        match = re.search(r"serving trust domain \S+ on https://127.0.0.1:(\d+)", line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(match.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the server did not start")


def bulk_create(config_file: Path, first_agent: int, agents: int, work: Path, env: dict[str, str]) -> float:
    """Entries for agents [first_agent, first_agent + agents), 10 each, through the CLI; entries per second."""
    path = work / f"entries-{first_agent}.jsonl"
    with path.open("w") as out:
        for k in range(first_agent, first_agent + agents):
            for j in range(PER_AGENT):
                out.write(json.dumps({"spiffe_id": f"spiffe://{TD}/w/{k}/{j}",
                                      "parent_id": f"spiffe://{TD}/keyseal/agent/a{k}",
                                      "selectors": [f"unix:uid:{1000 + j}"]}) + "\n")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "keyseal", "entry", "create", "--config", str(config_file),
                             "--from-file", str(path)], capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"bulk create failed: {result.stderr.strip()[:300]}")
    return agents * PER_AGENT / elapsed


def bundle_pem(port: int) -> str:
    """The trust domain's CA certificates, from the server's public bundle endpoint (benchmark only: fetched
    without verifying the server)."""
    import http.client

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    connection.request("GET", "/v1/bundle")
    document = json.loads(connection.getresponse().read())
    connection.close()
    pems = []
    for key in document["keys"]:
        for der in key.get("x5c", []):
            body = base64.b64encode(base64.b64decode(der)).decode()
            pems.append("-----BEGIN CERTIFICATE-----\n" + "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
                        + "\n-----END CERTIFICATE-----\n")
    return "".join(pems)


class SimulatedAgent:
    def __init__(self, name: str, port: int, ca_pem: str, tokens: Any) -> None:
        from keyseal.agent.cache import AgentCache
        from keyseal.agent.client import ServerClient

        self.name = name
        self.client = ServerClient("127.0.0.1", port, ca_pem)
        token, _ = tokens.issue(name, timedelta(minutes=30))
        AgentCache(self.client, TD).join(token)  # a real join: the agent SVID the server issues
        self.revision = ""

    def sync(self, incremental: bool) -> dict[str, Any]:
        answer = self.client.call("/v1/agent/sync", {"revision": self.revision} if incremental else {})
        self.revision = answer["revision"]
        return answer


def drive(agents: list[SimulatedAgent], server_pid: int, seconds: float, threads: int,
          incremental: bool) -> dict[str, float]:
    """Syncs from `threads` threads, each cycling through its share of the agents, for `seconds`."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        mine = agents[index::threads]
        try:
            n = 0
            while time.monotonic() < stop:
                agent = mine[n % len(mine)]
                started = time.perf_counter()
                agent.sync(incremental)
                latencies[index].append(time.perf_counter() - started)
                n += 1
        except BaseException as exc:
            errors.append(exc)

    cpu_before = process_cpu(server_pid)
    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    cpu = process_cpu(server_pid) - cpu_before
    if errors:
        raise errors[0]
    flat = sorted(x for chunk in latencies for x in chunk)
    count = len(flat)
    return {"syncs": count, "rate": count / elapsed, "p50": flat[count // 2], "p99": flat[int(count * 0.99)],
            "cpu": cpu / count}


def measure(label: str, agents: list[SimulatedAgent], pid: int, args: argparse.Namespace,
            results: dict[str, dict[str, float]]) -> None:
    for agent in agents:  # every agent holds its current revision first
        answer = agent.sync(False)
        assert len(answer["entries"]) == PER_AGENT, (agent.name, len(answer["entries"]))
    for mode, incremental in (("full", False), ("incremental", True)):
        rounds = [drive(agents, pid, args.seconds, args.threads, incremental) for _ in range(args.rounds)]
        row = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        row["rss"] = process_rss_mib(pid)
        results[f"{label} {mode}"] = row
        print(f"  {label:>18} {mode:>11}: {row['syncs']:7.0f} syncs  p50 {row['p50'] * 1e3:6.2f} ms  "
              f"p99 {row['p99'] * 1e3:6.2f} ms  server CPU/sync {row['cpu'] * 1e6:6.0f} µs  "
              f"({5 / row['cpu']:8.0f} agents/core at 5 s)  RSS {row['rss']:6.1f} MiB", flush=True)


def join_sample(total_agents: int, sample: int, port: int, ca_pem: str, tokens: Any) -> list[SimulatedAgent]:
    step = max(total_agents // sample, 1)
    return [SimulatedAgent(f"a{k}", port, ca_pem, tokens) for k in range(0, total_agents, step)][:sample]


def run_store(store_label: str, config: dict[str, Any], sizes: list[int], work: Path, env: dict[str, str],
              args: argparse.Namespace, kube: Any = None) -> dict[str, dict[str, float]]:
    import yaml

    from keyseal.ca.config import parse_config
    from keyseal.ca.entries import join_tokens_for

    config_file = work / "server.yaml"
    config_file.write_text(yaml.safe_dump(config))
    api_client = kube.api_client() if kube is not None else None
    tokens = join_tokens_for(parse_config(config), api_client)
    results: dict[str, dict[str, float]] = {}
    server, port = start_server(config, work, env)
    try:
        ca_pem = bundle_pem(port)
        written = 0
        print(f"{store_label}: server pid {server.pid}, RSS at start {process_rss_mib(server.pid):.1f} MiB")
        for size in sizes:
            agents_total = size // PER_AGENT
            rate = bulk_create(config_file, written // PER_AGENT, agents_total - written // PER_AGENT, work, env)
            print(f"  bulk create to {size:,} entries: {rate:,.0f} entries/s", flush=True)
            results[f"{size} bulk"] = {"rate": rate}
            written = size
            agents = join_sample(agents_total, args.agents, port, ca_pem, tokens)
            if kube is not None:  # the server's informer must have seen every write before measuring
                deadline = time.monotonic() + 600
                while len(agents[-1].sync(False)["entries"]) < PER_AGENT and time.monotonic() < deadline:
                    time.sleep(0.1)
            measure(f"{size:,} entries", agents, server.pid, args, results)
            for agent in agents:
                agent.client.close()
        if kube is not None:
            results["watch"] = watch_latency(config_file, agents, env)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return results


def watch_latency(config_file: Path, agents: list[SimulatedAgent], env: dict[str, str]) -> dict[str, float]:
    """From `keyseal entry create` returning to the agent's sync answer holding the new entry."""
    agent = agents[0]
    agent.client.close()
    agent.sync(False)
    times = []
    for n in range(5):
        result = subprocess.run([sys.executable, "-m", "keyseal", "entry", "create", "--config", str(config_file),
                                 "--spiffe-id", f"spiffe://{TD}/watch/{n}", "--parent",
                                 f"spiffe://{TD}/keyseal/agent/{agent.name}", "--selector", "unix:uid:7"],
                                capture_output=True, text=True, env=env, check=False)
        assert result.returncode == 0, result.stderr
        created = time.perf_counter()
        while True:
            answer = agent.sync(True)
            if any(e["entry_id"] == result.stdout.strip() for e in answer.get("entries", [])):
                break
            time.sleep(0.002)
        times.append(time.perf_counter() - created)
    median = statistics.median(times)
    print(f"  a new entry reached the agent's sync through the watch in {median * 1e3:.0f} ms (median of 5; "
          f"includes the polling syncs)")
    return {"median": median}


def report(label: str, sizes: list[int], results: dict[str, dict[str, float]]) -> None:
    small, large = f"{sizes[0]:,} entries", f"{sizes[-1]:,} entries"
    for mode in ("full", "incremental"):
        a, b = results[f"{small} {mode}"], results[f"{large} {mode}"]
        print(f"{label} {mode}: {sizes[-1]:,} / {sizes[0]:,} ratio: p50 {b['p50'] / a['p50']:.2f}, p99 "
              f"{b['p99'] / a['p99']:.2f}, server CPU per sync {b['cpu'] / a['cpu']:.2f} (target <= 1.5); agents "
              f"per core at 5 s at {sizes[-1]:,}: {5 / b['cpu']:,.0f} (target >= 10,000)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--agents", type=int, default=200, help="joined agents that sync (a sample)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measured round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="client threads (connections in flight)")
    parser.add_argument("--kubernetes", action="store_true", help="also the Kubernetes store (harness API peer)")
    parser.add_argument("--kube-sizes", default="1000,10000")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="keyseal-bench-sync-"))
    env = dict(os.environ, KEYSEAL_HOME=str(work / "home"), KUBECONFIG=str(work / "no-kubeconfig"),
               PYTHONPATH=str(ROOT / "src"))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    os.environ.update(KEYSEAL_HOME=env["KEYSEAL_HOME"], KUBECONFIG=env["KUBECONFIG"])
    os.environ.pop("KUBERNETES_SERVICE_HOST", None)
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}; {args.agents} joined agents, {args.threads} client threads, "
          f"median of {args.rounds} rounds of {args.seconds:g} s")
    base: dict[str, Any] = {
        "trustDomain": TD,
        "keyWrapping": {"provider": "local", "local": {"kekFile": str(work / "kek")}},
        "store": {"type": "directory", "directory": {"path": str(work / "store")}},
        # Every simulated agent comes from 127.0.0.1 (real ones from their nodes' addresses): one source may hold
        # as many kept-alive connections as there are agents.
        "server": {"listen": "127.0.0.1:0", "connections": {"max": 4096, "perSource": 4096}},
        "logLevel": "info",
    }
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        results = run_store("directory store (SQLite)", base, sizes, work, env, args)
        report("directory", sizes, results)
        if args.kubernetes:
            from tests.harness.kube_api import KubeApi

            kube = KubeApi().start()
            try:
                kube_work = work / "kube"
                kube_work.mkdir()
                config = dict(base, store={"type": "kubernetes", "kubernetes": {"namespace": "bench",
                                                                                "apiServer": kube.url}})
                kube_sizes = [int(s) for s in args.kube_sizes.split(",")]
                results = run_store("Kubernetes store (harness API peer)", config, kube_sizes, kube_work, env, args,
                                    kube)
                report("kubernetes", kube_sizes, results)
            finally:
                kube.stop()
        print(f"load average at the end {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
