"""Agent syncs against `keyseal server` at 1,000 and 100,000 registration entries (10 per agent): what one sync
costs must not grow with the total. Target: p50 latency and server CPU per sync at 100,000 entries at most 1.5x
those at 1,000; one server core sustains at least 10,000 agents syncing every 5 s at 100,000 entries.

How: the entries are written through the bulk path (`keyseal entry create --from-file`, timed: the bulk create
rate). `keyseal server` runs in a child process (wrapped custody, local KEK, info logs). A sample of simulated
agents, spread over the whole agent name space, join with real join tokens (so each holds a real agent X.509-SVID)
and sync over HTTPS with mutual TLS through keyseal's own agent client (`keyseal._internal.agent.client.ServerClient`, a
kept-alive connection per agent, as the agent keeps one). Rows: the first sync of an agent (`{}`: entries and
bundle), and the steady state (`{"revision": ...}` when nothing changed: neither is sent). Server CPU per sync is
the child's CPU time (from /proc) over the syncs answered; agents per core = 5 s / CPU per sync. RSS is the
child's VmRSS. Each size has its own server and store, both running, and the rounds alternate between them (this
machine's speed drifts within minutes), so every round gives a ratio; the table takes medians.

With --kubernetes the same is done against the Kubernetes store on the test harness's API peer (kmock with the
watch, bookmarks and resourceVersion the harness adds, in this process), which exercises the server's informer:
the entries are listed once at the server's first sync and watched after that. It also reports how long a new
entry takes to reach the agent's sync answer through the watch. The peer is far slower than an API server at
bulk writes (kmock scans its objects on every create, so a create slows as the peer fills: about 30 a second
at 500 objects), hence the small default sizes there (200 and 1,000).

Usage: python benchmarks/agent_sync.py [--sizes 1000,100000] [--agents 200] [--seconds 5] [--threads 4]
                                       [--kubernetes [--kube-sizes 200,1000]]
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
        from keyseal._internal.agent.cache import AgentCache
        from keyseal._internal.agent.client import ServerClient

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


def join_sample(total_agents: int, sample: int, port: int, ca_pem: str, tokens: Any) -> list[SimulatedAgent]:
    step = max(total_agents // sample, 1)
    return [SimulatedAgent(f"a{k}", port, ca_pem, tokens) for k in range(0, total_agents, step)][:sample]


def run_store(store_label: str, configs: list[dict[str, Any]], sizes: list[int], work: Path, env: dict[str, str],
              args: argparse.Namespace, kube: Any = None) -> dict[str, dict[str, float]]:
    """One server per size, each on its own store, measured in interleaved rounds (this machine's speed drifts
    within minutes: a ratio of rounds taken minutes apart measures the drift)."""
    import yaml

    from keyseal._internal.ca.config import parse_config
    from keyseal._internal.ca.registry.stores import join_tokens_for

    results: dict[str, dict[str, float]] = {}
    servers: list[tuple[int, subprocess.Popen[str], list[SimulatedAgent], Path]] = []
    try:
        for size, config in zip(sizes, configs, strict=True):
            where = work / f"size-{size}"
            where.mkdir()
            config_file = where / "server.yaml"
            config_file.write_text(yaml.safe_dump(config))
            rate = bulk_create(config_file, 0, size // PER_AGENT, where, env)
            print(f"{store_label}: bulk create of {size:,} entries: {rate:,.0f} entries/s", flush=True)
            results[f"{size} bulk"] = {"rate": rate}
            server, port = start_server(config, where, env)
            tokens = join_tokens_for(parse_config(config), kube.api_client() if kube is not None else None)
            agents = join_sample(size // PER_AGENT, args.agents, port, bundle_pem(port), tokens)
            for agent in agents:  # every agent holds its current revision first
                answer = agent.sync(False)
                assert len(answer["entries"]) == PER_AGENT, (agent.name, len(answer["entries"]))
            servers.append((size, server, agents, config_file))
        rounds: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for size, server, agents, _ in servers:
                for mode, incremental in (("full", False), ("incremental", True)):
                    rounds.setdefault(f"{size:,} entries {mode}", []).append(
                        drive(agents, server.pid, args.seconds, args.threads, incremental))
        for (size, server, _, _), mode in ((s, m) for s in servers for m in ("full", "incremental")):
            label = f"{size:,} entries {mode}"
            row = {k: statistics.median(r[k] for r in rounds[label]) for k in rounds[label][0]}
            row["rss"] = process_rss_mib(server.pid)
            row["cpu_rounds"] = rounds[label]  # type: ignore[assignment]
            results[label] = row
            print(f"  {label:>30}: {row['syncs']:6.0f} syncs/round  p50 {row['p50'] * 1e3:5.2f} ms  "
                  f"p99 {row['p99'] * 1e3:6.2f} ms  server CPU/sync {row['cpu'] * 1e6:5.0f} µs  "
                  f"({5 / row['cpu']:6.0f} agents/core at 5 s)  server RSS {row['rss']:5.1f} MiB", flush=True)
        if kube is not None:
            results["watch"] = watch_latency(servers[-1][3], servers[-1][2], env)
    finally:
        for _, server, agents, _ in servers:
            for agent in agents:
                agent.client.close()
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
        by_round = " ".join(f"{y['cpu'] / x['cpu']:.2f}" for x, y in zip(
            a["cpu_rounds"], b["cpu_rounds"], strict=True))  # type: ignore[call-overload]
        print(f"{label} {mode}: {sizes[-1]:,} / {sizes[0]:,} ratio: p50 {b['p50'] / a['p50']:.2f}, p99 "
              f"{b['p99'] / a['p99']:.2f}, server CPU per sync {b['cpu'] / a['cpu']:.2f} (by round {by_round}; "
              f"target <= 1.5); agents per core at 5 s at {sizes[-1]:,}: {5 / b['cpu']:,.0f} (target >= 10,000)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--agents", type=int, default=200, help="joined agents that sync (a sample)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measured round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="client threads (connections in flight)")
    parser.add_argument("--kubernetes", action="store_true", help="also the Kubernetes store (harness API peer)")
    parser.add_argument("--kube-sizes", default="200,1000")
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
        # Every simulated agent comes from 127.0.0.1 (real ones from their nodes' addresses): one source may hold
        # as many kept-alive connections as there are agents.
        "server": {"listen": "127.0.0.1:0", "connections": {"max": 4096, "perSource": 4096}},
        "logLevel": "info",
    }
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        configs = [dict(base, store={"type": "directory", "directory": {"path": str(work / f"store-{n}")}})
                   for n in sizes]
        (work / "dir").mkdir()
        results = run_store("directory store (SQLite)", configs, sizes, work / "dir", env, args)
        report("directory", sizes, results)
        if args.kubernetes:
            from tests.harness.kube_api import KubeApi

            kube = KubeApi().start()
            try:
                (work / "kube").mkdir()
                kube_sizes = [int(s) for s in args.kube_sizes.split(",")]
                configs = [dict(base, store={"type": "kubernetes", "kubernetes": {"namespace": f"bench-{n}",
                                                                                  "apiServer": kube.url}})
                           for n in kube_sizes]
                results = run_store("Kubernetes store (harness API peer)", configs, kube_sizes, work / "kube", env,
                                    args, kube)
                report("kubernetes", kube_sizes, results)
            finally:
                kube.stop()
        print(f"load average at the end {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
