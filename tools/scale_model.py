"""The arithmetic of docs/SCALE.md: what N hosts x M generators ask of the Redis tier, from the
figures measured in docs/BENCHMARKS.md ("The remote tier on Redis"). Prints the tables.

    python3 tools/scale_model.py

Inputs (edit the constants to model another workload):
- KV bytes per token (fp16 K+V, all layers) of the model;
- per request: the prefix tokens that come from the remote when the host has not seen them
  (REMOTE_PREFIX), how often a generator starts a request (RATE), and the share of requests
  whose prefix is new to their host (REMOTE_SHARE; the rest hit the host's local tier or are
  computed);
- the working set: distinct prefixes each host brings (PREFIXES_PER_HOST) of REMOTE_PREFIX
  tokens each, and how many new prefix tokens per second the fleet uploads.
Measured: a Redis node serves about NODE_GBPS to many readers (tools/redis_scale_bench.py, 16
cores, loopback); Redis holds MEMORY_PER_BYTE bytes per value byte; one daemon reads
DAEMON_READ_GBPS from the tier (tqstore bench remote, 2 cores).
"""

from __future__ import annotations

import math

MODELS = {  # fp16 K+V bytes per token: 2 (K, V) x 2 bytes x layers x KV heads x head dim
    "SmolLM2-135M": 2 * 2 * 30 * 3 * 64,
    "Llama-3-8B": 2 * 2 * 32 * 8 * 128,
    "Llama-3-70B": 2 * 2 * 80 * 8 * 128,
}
NODE_GBPS = 2.5  # one Redis node, many readers (BENCHMARKS.md: 2.3-3.4 from 4 readers up)
MEMORY_PER_BYTE = 1.084  # Redis used_memory per value byte
DAEMON_READ_GBPS = 0.97  # one daemon's verified reads, blocks kept (2-core VM)
NODE_MEMORY_GB = 48  # usable per node (a 64 GB machine with room for fork, buffers)
REPLICAS = 1
GENERATORS_PER_HOST = 8
RATE = 0.1  # requests per second per generator (an agent turn every 10 s)
REMOTE_SHARE = 0.05  # of requests whose prefix is new to their host
REMOTE_PREFIX = 8192  # tokens fetched from the remote by such a request
PREFIXES_PER_HOST = 20  # distinct REMOTE_PREFIX-token prefixes each host adds to the working set


def fleet(model: str, hosts: int) -> dict[str, float]:
    b = MODELS[model]
    per_hit = REMOTE_PREFIX * b
    per_host = GENERATORS_PER_HOST * RATE * REMOTE_SHARE * per_hit
    egress = hosts * per_host
    working = hosts * PREFIXES_PER_HOST * REMOTE_PREFIX * b
    memory = working * MEMORY_PER_BYTE * (1 + REPLICAS)
    by_bandwidth = math.ceil(egress / (NODE_GBPS * 1e9))
    by_memory = math.ceil(memory / (NODE_MEMORY_GB * 1e9) / (1 + REPLICAS))
    return {"hit_gb": per_hit / 1e9, "hit_s": per_hit / (DAEMON_READ_GBPS * 1e9),
            "host_mbps": per_host / 1e6, "egress_gbps": egress / 1e9,
            "memory_tb": memory / 1e12, "masters_bw": by_bandwidth, "masters_mem": by_memory,
            "masters": max(by_bandwidth, by_memory, 3)}


def main() -> None:
    print(f"{GENERATORS_PER_HOST} generators per host, {RATE} requests/s each, "
          f"{REMOTE_SHARE:.0%} of them fetch {REMOTE_PREFIX} tokens from the remote; "
          f"{PREFIXES_PER_HOST} prefixes of {REMOTE_PREFIX} tokens per host in the working set; "
          f"{REPLICAS} replica per master\n")
    print("| model | hosts | one remote hit GB (s at one daemon's read rate) | per host MB/s "
          "| fleet egress GB/s | Redis memory TB (with replicas) | masters for bandwidth "
          "| masters for memory | masters (>= 3) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for hosts in (1, 10, 30, 100):
            f = fleet(model, hosts)
            print(f"| {model} | {hosts} | {f['hit_gb']:.2f} ({f['hit_s']:.2f} s) | "
                  f"{f['host_mbps']:.1f} | {f['egress_gbps']:.2f} | {f['memory_tb']:.3f} | "
                  f"{f['masters_bw']} | {f['masters_mem']} | {f['masters']} |")


if __name__ == "__main__":
    main()
