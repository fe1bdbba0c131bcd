#!/usr/bin/env python3
"""How long a one-caption request waits while another client's single request of large images is
being preprocessed: the fairness of the executor's preprocessing pool.

    scripts/bench_fairness.py CLIPFT_BINARY MODEL_DIR   # with the Python of target/interop-venv

Starts `CLIPFT_BINARY executor` on the CPU, writes 16 random 4000x3000 JPEGs (once, in
/tmp/clipft-fairness), has a separate process send them as one clip_client request, and times
caption requests sent one after another until it is done. Prints JSON: the big request's
seconds, and the captions' count, median, first and worst latency. Run two binaries alternately
to compare them; see BENCHMARKS.md, session 14."""
import json, os, socket, subprocess, sys, threading, time
import numpy as np
from PIL import Image

binary, model = sys.argv[1], sys.argv[2]
imgs = []
rng = np.random.default_rng(0)
for i in range(16):
    os.makedirs("/tmp/clipft-fairness", exist_ok=True)
    p = f"/tmp/clipft-fairness/big{i}.jpg"
    if not os.path.exists(p):
        Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(p, quality=90)
    imgs.append(p)
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
proc = subprocess.Popen([binary, "executor", "--model", model, "--port", str(port), "--port-monitoring", "0",
                         "--device", "cpu", "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
from clip_client import Client
c = Client(f"grpc://127.0.0.1:{port}")
for _ in range(100):
    try:
        c.encode(["warm up"]); break
    except Exception:
        time.sleep(0.2)
c.encode([imgs[0]])
res = {}
code = f"import time; from clip_client import Client; t=time.time(); Client('grpc://127.0.0.1:{port}').encode({imgs!r}, batch_size={len(imgs)}); print(time.time()-t)"
big = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
time.sleep(1.5)
lat = []
while big.poll() is None:
    t = time.time(); c.encode(["a red dress"]); lat.append(time.time() - t)
res["big_s"] = float(big.stdout.read().strip() or "nan")
proc.terminate(); proc.wait()
first = lat[0] if lat else None
lat.sort()
res.update(probes=len(lat), p50_ms=round(1000 * lat[len(lat) // 2], 1), max_ms=round(1000 * lat[-1], 1),
           first_ms=round(1000 * first, 1) if first else None)
print(json.dumps(res))
