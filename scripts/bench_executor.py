#!/usr/bin/env python3
"""End-to-end serving benchmark: `clipft executor` against the Python peer users run today
(scripts/peer_executor.py: a Jina Flow serving transformers CLIP the way clip_server's torch
executor does), both driven by the real clip_client, on the same weights, one server at a time.

    python scripts/bench_executor.py --model target/vit-b-32 [--seconds 20] [--out results.json]
        [--servers clipft,peer] [--clipft target/release/clipft] [--log-dir DIR]
        [--wait-quiet SECONDS] [--clipft-arg=ARG ...] [--peer-arg=ARG ...] [--gpu]

Run it with a Python that has jina, clip_client and docarray 0.21 (the peer's launcher, run with
--peer-python, default this Python, also needs torch and transformers): scripts/bench_executor.sh
builds such a venv from scripts/requirements-peer.txt. Progress goes to stderr, the table to
stdout. The clipft binary is copied first, so that a rebuild during the run cannot mix two
binaries; its sha256 and time are in the JSON.

For each server, in this order:
  startup     seconds from starting the process to (a) the gRPC health check answering SERVING
              (grpc.health.v1 on the port clip_client uses: clipft itself, the peer's Flow
              gateway), polled every 50 ms on a fresh channel, and (b) the first successful
              `Client.encode(['x'])`, polled every 200 ms once (a) holds. (b) is the comparable
              number: the peer's gateway answers SERVING before its executor has loaded the model.
  texts/s     `Client('grpc://127.0.0.1:P').encode(texts)` with clip_client's defaults (batch_size
              8, prefetch 100) on caption-length texts (5 to 15 words, generated from word lists
              with a fixed seed). A warm-up call of 64 texts first; its rate sizes the timed call
              to about --seconds (a timed call shorter than half that is redone, sized anew).
  images/s    the same with paths of 600x400 JPEG files (48 distinct synthetic pictures, quality
              90, written to a temporary folder), which clip_client loads into blobs the way it
              does for users. Warm-up of 16 images first.
  latency     a second process keeps the text load running (one clip_client encode call at its
              defaults over an endless stream of captions) while this process, once that load has
              settled, sends 8-text encode requests one after another for --seconds (and at least
              --min-probes of them, within --max-probe-seconds) and times each one end to end;
              p50, p99 and max are reported with the number of probes (p99 of a few probes is
              their max), and the background stream's texts/s meanwhile. The background client is
              then killed and the executor left to become idle. This phase comes last because a
              client that goes away with more than `prefetch` requests outstanding leaves Jina's
              gateway busy-waiting on a full core for good (and such a stream keeps it
              busy-waiting while it lasts: the peer's texts/s for one long stream is the
              background rate here, its texts/s above is for one call of fewer than 100 requests).
  text-only   the server is started again with the text tower alone (`--select-model clip-text`
              for both), warmed up with 64 texts, loaded with texts for about --seconds / 2.

Memory: VmRSS and VmHWM of the executor process, read from /proc every 100 ms for the whole run:
clipft's one process; for the peer the Jina executor process only (it writes its pid to
CLIP_PEER_PID_FILE), not the launcher or the gateway (the sum over all of the server's processes
is reported apart as server_tree). peak = the largest VmHWM; steady = the median VmRSS during the
image load (after the text load, so with both towers warm).

GPU memory (--gpu, for servers on a GPU): the device's used memory every 200 ms (NVML through
pynvml where it imports, else nvidia-smi), less what was used just before the server started.
One server runs at a time, so the difference is that server's, its CUDA context included: peak =
the largest, steady = the median during the image load. --clipft-arg / --peer-arg put the
servers on the GPU (scripts/gpu-check.sh part 3: `--device cuda --dtype f16` for clipft,
`--device cuda` for the peer, whose dtype is then fp16 as clip_server's on CUDA).

CPU: the cores used by the executor, by the server's whole process tree, by this benchmark's
client processes and by everything else on the machine are reported per phase; phases in which
everything else used over 0.3 cores are listed under the table as perturbed. --wait-quiet SECONDS
waits (at most that long) for a quiet machine before each server start and each load. The
clients run on the same machine as the server, as in the issue's measurements.

Servers are stopped with SIGTERM, then SIGKILL after 20 s (the peer's Flow often never exits: its
gateway is left busy-waiting after the latency phase, and now and then also after requests failed
while its executor was still loading). Everything runs on 127.0.0.1, on ports picked free.

Output: a Markdown table on stdout (clipft, peer, clipft/peer) and, with --out, a JSON file with
every number, the per-phase memory and CPU, the run's metadata (time, load average, CPU, versions,
binary) and any error with the tail of the failing server's log. A server that fails is reported
as failed and the other one still runs; the exit status is then 1.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path

os.environ.setdefault('JINA_OPTOUT_TELEMETRY', '1')
os.environ.setdefault('JINA_HIDE_SURVEY', '1')

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from clip_client import Client  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REQUEST_DOCS = 8  # clip_client's default batch_size
STARTUP_TIMEOUT = 600
ENCODE_AFTER_SERVING_TIMEOUT = 60
ENCODE_POLL_INTERVAL = 0.2  # a failing clip_client call costs CPU: poll no faster
STOP_GRACE = 20


def quiet():
    """No warnings, and no asyncio noise from the gRPC channels of finished Jina clients."""
    warnings.filterwarnings('ignore')
    logging.getLogger('asyncio').setLevel(logging.CRITICAL)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Inputs


ADJECTIVES = 'red blue green yellow black white striped wooden old small large shiny dusty bright dark soft tall tiny vintage modern wet'.split()
NOUNS = 'dog cat dress chair table car bicycle woman man child bird house tree boat lamp shoe bag cup guitar horse train window'.split()
PLACES = 'beach street kitchen park forest garden market station field river bridge room shop roof hill desk'.split()
VERBS = 'sitting standing lying leaning resting waiting parked hanging'.split()
EXTRAS = [
    'at sunset',
    'in the rain',
    'with a blue sky',
    'on a sunny day',
    'in black and white',
    'under soft light',
    'with people walking by',
    'in the early morning',
]


def captions(n, seed):
    """n caption-like texts of 5 to 15 words."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        words = ['a', rng.choice(ADJECTIVES), rng.choice(NOUNS)]
        if rng.random() < 0.6:
            words.append(rng.choice(VERBS))
        prep = rng.choice(['on', 'next to', 'under', 'near', 'behind', 'in front of', 'beside'])
        words += prep.split() + ['a', rng.choice(ADJECTIVES), rng.choice(PLACES)]
        if rng.random() < 0.7:
            words += rng.choice(EXTRAS).split()
        if rng.random() < 0.3:
            words += ['with', 'a', rng.choice(ADJECTIVES), rng.choice(NOUNS)]
        if 5 <= len(words) <= 15:
            out.append(' '.join(words))
    return out


def make_images(folder, n=48, seed=0, size=(600, 400), quality=90):
    """n distinct synthetic 600x400 JPEG pictures: a gradient, shapes and sensor-like noise."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        angle = rng.uniform(0, math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / (t.max() - t.min())
        c0 = np.array([rng.randrange(256) for _ in range(3)], np.float32)
        c1 = np.array([rng.randrange(256) for _ in range(3)], np.float32)
        base = c0 * (1 - t[..., None]) + c1 * t[..., None]
        img = Image.fromarray(base.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(4, 12)):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            x1, y1 = x0 + rng.randint(20, 250), y0 + rng.randint(20, 200)
            color = tuple(rng.randrange(256) for _ in range(3))
            shape = rng.choice(['ellipse', 'rectangle', 'polygon'])
            if shape == 'polygon':
                pts = [(rng.randrange(w), rng.randrange(h)) for _ in range(rng.randint(3, 6))]
                draw.polygon(pts, fill=color)
            else:
                getattr(draw, shape)([x0, y0, x1, y1], fill=color)
        noise = np.random.default_rng(seed * 1000 + i).normal(0, 6, (h, w, 3))
        pixels = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
        path = folder / f'img_{i:03d}.jpg'
        Image.fromarray(pixels).save(path, quality=quality)
        paths.append(str(path))
    return paths


def cycle(items, n):
    return [items[i % len(items)] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Processes and memory


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def read_status(pid):
    """(VmRSS, VmHWM) of a process in KiB, or None once it is gone."""
    try:
        with open(f'/proc/{pid}/status') as f:
            fields = dict(line.split(':', 1) for line in f if line.startswith(('VmRSS', 'VmHWM')))
        return int(fields['VmRSS'].split()[0]), int(fields['VmHWM'].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def machine_busy_seconds():
    """CPU seconds all processes of the machine have used (user, nice, system, irq, softirq, steal)."""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf('SC_CLK_TCK')


def wait_quiet(limit, busy=0.15, quiet_for=3):
    """Wait, at most `limit` seconds, until the machine has used under `busy` cores for
    `quiet_for` seconds in a row (call it while the server under test is idle)."""
    if limit <= 0:
        return
    t0, run = time.monotonic(), 0
    last = machine_busy_seconds()
    while time.monotonic() - t0 < limit:
        time.sleep(1.0)
        now = machine_busy_seconds()
        run = run + 1 if now - last < busy else 0
        last = now
        if run >= quiet_for:
            waited = time.monotonic() - t0
            if waited > quiet_for + 1:
                log(f'  waited {waited:.0f} s for the machine to become quiet')
            return
    log(f'  the machine did not become quiet within {limit:.0f} s; going on')


def descendants(pid):
    """pid and every process below it, from /proc/*/stat."""
    parent = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    stat = f.read()
                parent[int(entry)] = int(stat[stat.rindex(')') + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


class Sampler(threading.Thread):
    """Every 100 ms: VmRSS, VmHWM and CPU time of the measured process; the sums of VmRSS and CPU
    time over the server's whole process tree; the CPU time of this benchmark's own processes (the
    clients) and of the whole machine. Each sample is tagged with the current phase."""

    def __init__(self, root_pid):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.pid = None  # the measured process, set once known
        self.phase = 'start'
        # (time, phase, rss_kib, hwm_kib, cpu_s, tree_rss_kib, tree_cpu_s, clients_cpu_s, machine_cpu_s)
        self.samples = []
        self._done = threading.Event()

    def run(self):
        tree, clients, listed_at = set(), set(), 0.0
        # pid -> CPU seconds when last seen, so that processes that exited keep counting
        tree_seen, clients_seen = {}, {}
        while not self._done.is_set():
            now = time.monotonic()
            if now - listed_at > 1.0:
                tree = descendants(self.root_pid)
                clients = descendants(os.getpid()) - tree
                listed_at = now
            if self.pid is not None:
                own, cpu = read_status(self.pid), cpu_seconds(self.pid)
                if own is not None and cpu is not None:
                    for pids, seen in ((tree, tree_seen), (clients, clients_seen)):
                        for p in pids:
                            c = cpu_seconds(p)
                            if c is not None:
                                seen[p] = c
                    tree_rss = sum((read_status(p) or (0, 0))[0] for p in tree)
                    tree_cpu, clients_cpu = sum(tree_seen.values()), sum(clients_seen.values())
                    busy = machine_busy_seconds()
                    self.samples.append((now, self.phase, own[0], own[1], cpu, tree_rss, tree_cpu, clients_cpu, busy))
            self._done.wait(0.1)

    def stop(self):
        self._done.set()
        self.join()

    def summary(self, steady_phase):
        """Peak = the largest VmHWM; steady = the median VmRSS during `steady_phase`; per phase the
        largest VmRSS and the CPU cores used: by the executor, by the server's process tree, by
        this benchmark's clients, and by everything else on the machine (a compiler running beside
        the benchmark shows there)."""
        if not self.samples:
            return {}
        mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
        phases = {}
        for t, phase, rss, hwm, cpu, tree_rss, tree_cpu, clients_cpu, busy in self.samples:
            first = (t, cpu, tree_cpu, clients_cpu, busy)
            p = phases.setdefault(phase, {'rss_max_mib': 0, 'hwm_mib': 0, 'server_tree_rss_max_mib': 0, '_first': first})
            p['rss_max_mib'] = max(p['rss_max_mib'], mib(rss))
            p['hwm_mib'] = max(p['hwm_mib'], mib(hwm))
            p['server_tree_rss_max_mib'] = max(p['server_tree_rss_max_mib'], mib(tree_rss))
            p['_last'] = first
        for p in phases.values():
            (t0, c0, tc0, cc0, b0), (t1, c1, tc1, cc1, b1) = p.pop('_first'), p.pop('_last')
            p['seconds'] = round(t1 - t0, 1)
            rate = lambda a, b: round(max(0.0, (b - a) / (t1 - t0)), 2) if t1 > t0 else None  # noqa: E731
            p['executor_cpu_cores'] = rate(c0, c1)
            p['server_tree_cpu_cores'] = rate(tc0, tc1)
            p['client_cpu_cores'] = rate(cc0, cc1)
            p['other_cpu_cores'] = rate(b0 - tc0 - cc0, b1 - tc1 - cc1)
        steady = [s[2] for s in self.samples if s[1] == steady_phase]
        return {
            'rss_peak_mib': mib(max(s[3] for s in self.samples)),
            'rss_steady_mib': mib(statistics.median(steady)) if steady else None,
            'rss_steady_phase': steady_phase,
            'rss_last_mib': mib(self.samples[-1][2]),
            'server_tree_rss_peak_mib': mib(max(s[5] for s in self.samples)),
            'samples': len(self.samples),
            'phases': phases,
        }


def gpu_reader():
    """A function that returns the GPU's used memory in MiB (device 0, or CUDA_VISIBLE_DEVICES'
    first), or None where no GPU can be read."""
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20

    def smi():
        with contextlib.suppress(Exception):
            out = subprocess.run(
                ['nvidia-smi', '--query-gpu=memory.used', '--format=csv,noheader,nounits', '--id=0'],
                capture_output=True, text=True, timeout=10,
            ).stdout  # fmt: skip
            return float(out.split()[0])
        return None

    return smi


class GpuSampler(threading.Thread):
    """Every 200 ms the GPU's used memory less `baseline` (what was used before the server
    started), tagged with the server's current phase (read from its RSS sampler)."""

    def __init__(self, read, phase_of):
        super().__init__(daemon=True)
        self.read, self.phase_of = read, phase_of
        self.baseline = read()
        self.samples = []  # (phase, MiB over the baseline)
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            used = self.read()
            if used is not None and self.baseline is not None:
                self.samples.append((self.phase_of(), used - self.baseline))
            self._done.wait(0.2)

    def stop(self):
        self._done.set()
        self.join()

    def summary(self, steady_phase):
        if not self.samples:
            return {'error': 'no GPU memory could be read'}
        steady = [m for phase, m in self.samples if phase == steady_phase]
        return {
            'peak_mib': round(max(m for _, m in self.samples), 1),
            'steady_mib': round(statistics.median(steady), 1) if steady else None,
            'steady_phase': steady_phase,
            'baseline_mib': round(self.baseline, 1),
            'samples': len(self.samples),
        }


class Server:
    """One server process: started, polled until it serves, sampled, stopped."""

    def __init__(self, kind, args, model, select_model, workdir):
        self.kind, self.select_model = kind, select_model
        self.port = free_port()
        self.log_path = workdir / f'{kind}-{select_model}.log'
        self.pid_file = workdir / f'{kind}-{select_model}.pid'
        # Read before the process starts: the baseline of the GPU memory it will use.
        self.gpu = GpuSampler(args.gpu_read, lambda: self.sampler.phase) if args.gpu else None
        env = dict(os.environ)
        if kind == 'clipft':
            cmd = [
                args.clipft, 'executor', '--model', model, '--port', str(self.port),
                '--port-monitoring', '0', '--host', '127.0.0.1', '--select-model', select_model,
                *args.clipft_arg,
            ]  # fmt: skip
        else:
            cmd = [
                args.peer_python, str(ROOT / 'scripts' / 'peer_executor.py'), '--model', model,
                '--port', str(self.port), '--select-model', select_model, *args.peer_arg,
            ]  # fmt: skip
            env['CLIP_PEER_PID_FILE'] = str(self.pid_file)
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
        self.cmd = cmd
        self._log = open(self.log_path, 'wb')
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT
        )
        self.sampler = Sampler(self.proc.pid)
        if kind == 'clipft':
            self.sampler.pid = self.proc.pid
        self.sampler.start()
        if self.gpu is not None:
            self.gpu.start()

    @property
    def target(self):
        return f'grpc://127.0.0.1:{self.port}'

    def log_tail(self, lines=40):
        self._log.flush()
        with contextlib.suppress(OSError):
            return '\n'.join(self.log_path.read_text(errors='replace').splitlines()[-lines:])
        return ''

    def _check_alive(self):
        if self.sampler.pid is None and self.pid_file.exists():
            with contextlib.suppress(ValueError):
                self.sampler.pid = int(self.pid_file.read_text().strip())
        if self.proc.poll() is not None:
            raise RuntimeError(f'{self.kind} exited with status {self.proc.returncode}')

    def wait_serving(self):
        """Seconds from start to health SERVING and to the first successful encode."""
        deadline = self.t0 + STARTUP_TIMEOUT
        health = None
        while health is None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f'{self.kind}: no SERVING health after {STARTUP_TIMEOUT} s')
            channel = grpc.insecure_channel(f'127.0.0.1:{self.port}')
            try:
                r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=''), timeout=0.5)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    health = time.monotonic() - self.t0
            except grpc.RpcError:
                pass
            finally:
                channel.close()
            if health is None:
                time.sleep(0.05)
        client = Client(self.target)
        last = None
        deadline = min(deadline, time.monotonic() + ENCODE_AFTER_SERVING_TIMEOUT)
        while True:
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f'{self.kind}: SERVING after {health:.2f} s but no successful encode '
                    f'{ENCODE_AFTER_SERVING_TIMEOUT} s later; last error: {last}'
                )
            try:
                e = client.encode(['x'])
                if e is not None and len(e) == 1:
                    return health, time.monotonic() - self.t0
                last = f'encode returned {e!r}'
            except Exception as ex:  # noqa: BLE001 - keep polling, report the last error
                last = ex
            time.sleep(ENCODE_POLL_INTERVAL)

    def measured_pid(self):
        self._check_alive()
        if self.sampler.pid is None:
            raise RuntimeError(f'{self.kind}: the executor did not write its pid to {self.pid_file}')
        return self.sampler.pid

    def stop(self):
        """SIGTERM, then SIGKILL to the whole process group after STOP_GRACE seconds."""
        result = {}
        self.sampler.phase = 'stopping'
        if self.proc.poll() is None:
            t = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE)
                result = {'stop_seconds': round(time.monotonic() - t, 2), 'exit_status': self.proc.returncode}
            except subprocess.TimeoutExpired:
                result = {'stop_seconds': None, 'exit_status': f'killed after {STOP_GRACE} s'}
        else:
            result = {'exit_status': self.proc.returncode}
        # Whatever is left of the group (the peer's gateway and executor) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.sampler.stop()
        if self.gpu is not None:
            self.gpu.stop()
        self._log.close()
        return result


# ---------------------------------------------------------------------------------------------
# Load


def timed_encode(client, items):
    t = time.perf_counter()
    out = client.encode(items)
    dt = time.perf_counter() - t
    if out is None or len(out) != len(items):
        raise RuntimeError(f'encode of {len(items)} items returned {None if out is None else len(out)} embeddings')
    return dt


def sized(rate, seconds, minimum):
    """A multiple of the request size worth about `seconds` at `rate` items/s."""
    n = int(rate * seconds) // REQUEST_DOCS * REQUEST_DOCS
    return max(minimum, n)


def throughput(server, client, items, warmup_n, seconds, minimum, phase, quiet_limit=0):
    wait_quiet(quiet_limit)
    server.sampler.phase = f'{phase}-warmup'
    dt = timed_encode(client, cycle(items, warmup_n))
    warm_rate = warmup_n / dt
    n = sized(warm_rate, seconds, minimum)
    server.sampler.phase = phase
    shifted = items[warmup_n % len(items) :] + items[: warmup_n % len(items)]
    for _ in range(3):
        # A cold warm-up can underestimate the rate: redo a run that came out far too short.
        cpu = time.process_time()
        dt = timed_encode(client, cycle(shifted, n))
        if dt >= seconds / 2:
            break
        n = sized(n / dt, seconds, minimum)
    return {
        'items': n,
        'seconds': round(dt, 2),
        'per_second': round(n / dt, 2),
        'warmup_per_second': round(warm_rate, 2),
        'client_cpu_cores': round((time.process_time() - cpu) / dt, 2),
    }


def _background_load(target, texts, pulled, completed, first_response, errors):
    """In its own process: one clip_client encode call at the defaults over an endless caption
    stream, counting the texts the client has taken from the stream and those embedded. Runs
    until killed."""
    quiet()

    def stream():
        i = 0
        while True:
            yield texts[i % len(texts)]
            i += 1
            pulled.value = i

    def on_done(response):
        with completed.get_lock():
            completed.value += len(response.data.docs)
        first_response.set()

    try:
        Client(target).encode(stream(), on_done=on_done)
        errors.put('the endless encode call returned')
    except Exception as e:  # noqa: BLE001
        errors.put(f'{type(e).__name__}: {e}')


def cpu_seconds(pid):
    """User + system CPU time of a process so far, or None once it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    except (OSError, IndexError, ValueError):
        return None


def wait_idle(pid, timeout, busy=0.05):
    """Seconds until the process uses under `busy` of a core for a whole second (None: timeout)."""
    t0 = time.monotonic()
    last, last_t = cpu_seconds(pid), t0
    while time.monotonic() - t0 < timeout:
        time.sleep(1.0)
        now, now_t = cpu_seconds(pid), time.monotonic()
        if now is None or last is None:
            return None
        if (now - last) / (now_t - last_t) < busy:
            return time.monotonic() - t0
        last, last_t = now, now_t
    return None


def latency_under_load(server, client, texts, probe_texts, args):
    """8-text requests timed one after another while a second process keeps clip_client's default
    load on the server.

    Jina's client writes a stream's requests as fast as gRPC flow control lets it (the server side
    applies `prefetch`), so an endless stream first fills the connection's buffers with thousands
    of requests; the probes start once that has settled (the client takes texts from the stream
    no faster than the server embeds them). At the end the background client is killed, as a
    client that goes away, and the server is given time to become idle (its CPU use under 5%) so
    the next phase starts clean; that time is reported as drain_seconds."""
    wait_quiet(args.wait_quiet)
    ctx = mp.get_context('spawn')
    pulled, completed = ctx.Value('q', 0, lock=False), ctx.Value('q', 0)
    first_response, errors = ctx.Event(), ctx.Queue()
    bg = ctx.Process(
        target=_background_load,
        args=(server.target, texts, pulled, completed, first_response, errors),
        daemon=True,
    )  # fmt: skip
    server.sampler.phase = 'latency'
    bg.start()

    def check_bg():
        if not bg.is_alive():
            msg = errors.get(timeout=1) if not errors.empty() else f'exit status {bg.exitcode}'
            raise RuntimeError(f'the background load stopped: {msg}')

    try:
        if not first_response.wait(args.max_probe_seconds):
            check_bg()
            raise RuntimeError('the background load got no response')
        settle_t = time.monotonic()
        while time.monotonic() - settle_t < 60:
            p0, c0 = pulled.value, completed.value
            time.sleep(1.0)
            check_bg()
            if pulled.value - p0 <= completed.value - c0 + 10 * REQUEST_DOCS:
                break
        settle = time.monotonic() - settle_t
        backlog = pulled.value - completed.value
        probes = []
        c_start, t_start = completed.value, time.monotonic()
        cpu_bg, cpu_probe = cpu_seconds(bg.pid), time.process_time()
        end, hard_end = t_start + args.seconds, t_start + args.max_probe_seconds
        k = 0
        while (time.monotonic() < end or len(probes) < args.min_probes) and time.monotonic() < hard_end:
            check_bg()
            batch = cycle(probe_texts[k:] + probe_texts[:k], REQUEST_DOCS)
            k = (k + REQUEST_DOCS) % len(probe_texts)
            probes.append(timed_encode(client, batch))
        c_end, t_end = completed.value, time.monotonic()
        cpu_bg, cpu_probe = cpu_seconds(bg.pid) - cpu_bg, time.process_time() - cpu_probe
        check_bg()
    finally:
        bg.kill()
        bg.join()
    server.sampler.phase = 'latency-drain'
    log(f'  {len(probes)} probes in {t_end - t_start:.1f} s; waiting for the server to become idle')
    drain = wait_idle(server.sampler.pid, args.max_probe_seconds * 2)
    ms = sorted(p * 1000 for p in probes)
    return {
        'probes': len(ms),
        'p50_ms': round(float(np.percentile(ms, 50)), 1),
        'p99_ms': round(float(np.percentile(ms, 99)), 1),
        'max_ms': round(ms[-1], 1),
        'probe_window_seconds': round(t_end - t_start, 2),
        'background_texts_per_second': round((c_end - c_start) / (t_end - t_start), 2),
        'background_backlog_texts': backlog,
        'background_client_cpu_cores': round(cpu_bg / (t_end - t_start), 2),
        'probe_client_cpu_cores': round(cpu_probe / (t_end - t_start), 2),
        'settle_seconds': round(settle, 2),
        'drain_seconds': None if drain is None else round(drain, 2),
    }


# ---------------------------------------------------------------------------------------------
# One server


def run_server(kind, args, texts, probe_texts, images, workdir):
    res = {'kind': kind}
    log(f'== {kind}: both towers')
    wait_quiet(args.wait_quiet)
    server = Server(kind, args, args.model, 'all', workdir)
    phase = 'startup'
    try:
        res['command'] = ' '.join(server.cmd)
        health, first = server.wait_serving()
        res['executor_pid'] = server.measured_pid()
        res['startup'] = {'health_serving_seconds': round(health, 2), 'first_encode_seconds': round(first, 2)}
        log(f'  SERVING after {health:.2f} s, first encode after {first:.2f} s')
        server.sampler.phase = 'idle'
        client = Client(server.target)
        phase = 'texts'
        res['texts'] = throughput(server, client, texts, 64, args.seconds, 64, 'text', args.wait_quiet)
        log(f'  texts: {res["texts"]}')
        server.sampler.phase = 'idle'
        phase = 'images'
        res['images'] = throughput(server, client, images, 16, args.seconds, 32, 'image', args.wait_quiet)
        log(f'  images: {res["images"]}')
        server.sampler.phase = 'idle'
        phase = 'latency'
        res['latency'] = latency_under_load(server, client, texts, probe_texts, args)
        log(f'  latency: {res["latency"]}')
        server.sampler.phase = 'idle'
        time.sleep(0.5)
    except Exception as e:  # noqa: BLE001 - report it and go on with the other server
        res['error'] = {'phase': phase, 'message': f'{type(e).__name__}: {e}', 'log_tail': server.log_tail()}
        log(f'  FAILED in {phase}: {e}\n{traceback.format_exc()}\n--- {kind} log ---\n{server.log_tail()}')
    finally:
        res['stop'] = server.stop()
        res['rss'] = server.sampler.summary('image')
        log(f'  stop: {res["stop"]}; RSS peak {res["rss"].get("rss_peak_mib")} MiB')
        if server.gpu is not None:
            res['gpu'] = server.gpu.summary('image')
            log(f'  GPU memory: {res["gpu"]}')
    if 'error' in res:
        return res

    log(f'== {kind}: clip-text only')
    wait_quiet(args.wait_quiet)
    server = Server(kind, args, args.model, 'clip-text', workdir)
    text_only = {}
    try:
        text_only['command'] = ' '.join(server.cmd)
        health, first = server.wait_serving()
        server.measured_pid()
        text_only['startup'] = {'health_serving_seconds': round(health, 2), 'first_encode_seconds': round(first, 2)}
        server.sampler.phase = 'idle'
        client = Client(server.target)
        text_only['texts'] = throughput(server, client, texts, 64, args.seconds / 2, 64, 'text', args.wait_quiet)
        log(f'  SERVING after {health:.2f} s, first encode after {first:.2f} s; texts: {text_only["texts"]}')
    except Exception as e:  # noqa: BLE001
        text_only['error'] = {'message': f'{type(e).__name__}: {e}', 'log_tail': server.log_tail()}
        log(f'  FAILED: {e}\n--- {kind} log ---\n{server.log_tail()}')
    finally:
        text_only['stop'] = server.stop()
        text_only['rss'] = server.sampler.summary('text')
        log(f'  RSS peak {text_only["rss"].get("rss_peak_mib")} MiB')
        if server.gpu is not None:
            text_only['gpu'] = server.gpu.summary('text')
            log(f'  GPU memory: {text_only["gpu"]}')
    res['text_only'] = text_only
    return res


# ---------------------------------------------------------------------------------------------
# Report


def get(d, *path):
    if path[-1] == 'cpu':  # "server / other" cores of a phase
        p = get(d, *path[:-1]) or {}
        if p.get('server_tree_cpu_cores') is None:
            return None
        return f"{p['server_tree_cpu_cores']:.2f} / {p['client_cpu_cores']:.2f} / {p['other_cpu_cores']:.2f}"
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


LOAD_PHASES = ('start', 'text', 'latency', 'image')
ROWS = [
    ('texts/s (clip_client defaults: batch 8, prefetch 100; one call)', ('texts', 'per_second'), 'higher'),
    ('images/s (600x400 JPEG files)', ('images', 'per_second'), 'higher'),
    ('8-text request under text load, p50 (ms)', ('latency', 'p50_ms'), 'lower'),
    ('8-text request under text load, p99 (ms)', ('latency', 'p99_ms'), 'lower'),
    ('  probes timed', ('latency', 'probes'), None),
    ('  texts/s of the endless background stream meanwhile', ('latency', 'background_texts_per_second'), 'higher'),
    ('  CPU cores: server / clients / other processes, text load', ('rss', 'phases', 'text', 'cpu'), None),
    ('  CPU cores: server / clients / other processes, latency phase', ('rss', 'phases', 'latency', 'cpu'), None),
    ('  CPU cores: server / clients / other processes, image load', ('rss', 'phases', 'image', 'cpu'), None),
    ('executor RSS peak, both towers (MiB)', ('rss', 'rss_peak_mib'), 'lower'),
    ('executor RSS steady (median during the image load), both towers (MiB)', ('rss', 'rss_steady_mib'), 'lower'),
    ('  all server processes, peak of summed RSS (MiB)', ('rss', 'server_tree_rss_peak_mib'), 'lower'),
    ('executor RSS peak, clip-text only (MiB)', ('text_only', 'rss', 'rss_peak_mib'), 'lower'),
    ('GPU memory peak, both towers (MiB; --gpu)', ('gpu', 'peak_mib'), 'lower'),
    ('GPU memory steady (median during the image load), both towers (MiB; --gpu)', ('gpu', 'steady_mib'), 'lower'),
    ('GPU memory peak, clip-text only (MiB; --gpu)', ('text_only', 'gpu', 'peak_mib'), 'lower'),
    ('start -> health SERVING, both towers (s)', ('startup', 'health_serving_seconds'), 'lower'),
    ('start -> first encode, both towers (s)', ('startup', 'first_encode_seconds'), 'lower'),
    ('start -> first encode, clip-text only (s)', ('text_only', 'startup', 'first_encode_seconds'), 'lower'),
]


def ratios(servers):
    out = {}
    a, b = servers.get('clipft', {}), servers.get('peer', {})
    for label, path, better in ROWS:
        if not better:
            continue
        x, y = get(a, *path), get(b, *path)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y:
            out['.'.join(path)] = round(x / y, 3)
    return out


def table(servers, rat):
    fmt = lambda v: '-' if v is None else (f'{v:.2f}' if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        '| metric | clipft | peer (Jina + transformers) | clipft / peer | better |',
        '|---|---|---|---|---|',
    ]
    for label, path, better in ROWS:
        r = rat.get('.'.join(path)) if better else None
        lines.append(
            f'| {label} | {fmt(get(servers.get("clipft"), *path))} | {fmt(get(servers.get("peer"), *path))} '
            f'| {"-" if r is None else f"{r:.2f}x"} | {better or ""} |'
        )
    busy = []
    for kind, res in servers.items():
        for run, where in (('both towers', res), ('clip-text only', res.get('text_only') or {})):
            for phase, p in (get(where, 'rss', 'phases') or {}).items():
                if phase in LOAD_PHASES and (p.get('other_cpu_cores') or 0) > 0.3:
                    busy.append(f'{kind} {run} {phase} ({p["other_cpu_cores"]:.2f} cores)')
    if busy:
        lines.append(
            '\nProcesses other than the server and the clients used over 0.3 cores during: ' + ', '.join(busy)
            + '; those numbers are perturbed.'
        )
    for kind, res in servers.items():
        for where in (res, res.get('text_only') or {}):
            if 'error' in where:
                lines.append(f'\n{kind} FAILED ({where["error"].get("phase", "clip-text only")}): {where["error"]["message"]}')
    return '\n'.join(lines)


def versions(args):
    v = {'python': platform.python_version()}
    for pkg in ('jina', 'clip-client', 'docarray', 'grpcio', 'protobuf', 'numpy', 'pillow'):
        with contextlib.suppress(metadata.PackageNotFoundError):
            v[pkg] = metadata.version(pkg)
    # torch and transformers as the peer's Python sees them (not imported here).
    with contextlib.suppress(Exception):
        out = subprocess.run(
            [args.peer_python, '-c', 'from importlib import metadata as m; print(m.version("torch"), m.version("transformers"))'],
            capture_output=True, text=True, timeout=60,
        ).stdout.split()  # fmt: skip
        v['peer torch'], v['peer transformers'] = out
    with contextlib.suppress(Exception):
        v['clipft'] = subprocess.run([args.clipft, '--version'], capture_output=True, text=True).stdout.strip()
    return v


def binary_info(path):
    st = os.stat(path)
    with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {'path': str(path), 'sha256': digest, 'modified': time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(st.st_mtime))}


def machine():
    m = {'cpus': os.cpu_count(), 'loadavg_start': os.getloadavg()}
    with contextlib.suppress(OSError):
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                m['cpu'] = line.split(':', 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        git = lambda *a: subprocess.run(['git', *a], capture_output=True, text=True, cwd=ROOT).stdout.rstrip()  # noqa: E731
        m['git_commit'] = git('rev-parse', 'HEAD')
        m['git_modified_files'] = [line[3:] for line in git('status', '--porcelain', '--untracked-files=no').splitlines()]
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True, help='local Hugging Face CLIP folder')
    p.add_argument('--seconds', type=float, default=20, help='length of each timed load (default 20)')
    p.add_argument('--out', help='write every number as JSON here')
    p.add_argument('--servers', default='clipft,peer', help='which of clipft,peer to run, in order')
    p.add_argument('--clipft', default=str(ROOT / 'target' / 'release' / 'clipft'))
    p.add_argument(
        '--clipft-arg', action='append', default=[], metavar='ARG',
        help='one more argument for `clipft executor` (repeat it: --clipft-arg=--queue-depth --clipft-arg=64)',
    )  # fmt: skip
    p.add_argument(
        '--peer-arg', action='append', default=[], metavar='ARG',
        help='one more argument for scripts/peer_executor.py (--peer-arg=--device --peer-arg=cuda)',
    )  # fmt: skip
    p.add_argument('--gpu', action='store_true', help="sample the GPU's used memory for each server")
    p.add_argument('--peer-python', default=sys.executable, help='Python with jina, torch and transformers')
    p.add_argument('--min-probes', type=int, default=3, help='latency probes to time at least (default 3)')
    p.add_argument(
        '--max-probe-seconds', type=float, default=300,
        help='stop starting latency probes after this long even if fewer than --min-probes (default 300)',
    )  # fmt: skip
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--log-dir', help="keep the servers' logs here (default: a temporary folder)")
    p.add_argument(
        '--wait-quiet', type=float, default=0, metavar='SECONDS',
        help='before starting a server and before each load, wait up to SECONDS for the rest of the '
        'machine to go quiet (for shared machines; default 0: no wait)',
    )  # fmt: skip
    args = p.parse_args()
    quiet()
    args.gpu_read = gpu_reader() if args.gpu else None
    if args.gpu and args.gpu_read() is None:
        p.error('--gpu: neither pynvml nor nvidia-smi reads a GPU here')
    args.model = str(Path(args.model).resolve())
    kinds = [k.strip() for k in args.servers.split(',') if k.strip()]
    for k in kinds:
        if k not in ('clipft', 'peer'):
            p.error(f'unknown server {k!r}')

    started = time.strftime('%Y-%m-%dT%H:%M:%S%z')
    meta = {'started': started, 'model': args.model, 'seconds': args.seconds, 'seed': args.seed, **machine()}
    meta['versions'] = versions(args)
    if args.gpu:
        with contextlib.suppress(Exception):
            meta['gpu'] = subprocess.run(
                ['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv,noheader', '--id=0'],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()  # fmt: skip
    log(f'bench_executor: {started}, model {args.model}, load average {meta["loadavg_start"]}')

    texts = captions(4096, args.seed)
    probe_texts = captions(512, args.seed + 1)
    servers = {}
    with tempfile.TemporaryDirectory(prefix='bench-executor-') as tmp:
        tmp = Path(tmp)
        if 'clipft' in kinds:
            # A private copy, so that a rebuild during the run cannot mix two binaries.
            meta['clipft_binary'] = binary_info(args.clipft)
            args.clipft = str(shutil.copy2(args.clipft, tmp / 'clipft'))
        images = make_images(tmp / 'images', seed=args.seed)
        meta['image_file_kib_mean'] = round(sum(os.path.getsize(x) for x in images) / len(images) / 1024, 1)
        meta['text_words_mean'] = round(sum(len(t.split()) for t in texts) / len(texts), 1)
        logs = Path(args.log_dir) if args.log_dir else tmp
        logs.mkdir(parents=True, exist_ok=True)
        for kind in kinds:
            servers[kind] = run_server(kind, args, texts, probe_texts, images, logs)
    meta['finished'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
    meta['loadavg_end'] = os.getloadavg()

    rat = ratios(servers)
    print(f'clipft executor vs Jina Flow + transformers CLIP (peer), both driven by clip_client; '
          f'model {args.model}; {meta["cpus"]} CPUs ({meta.get("cpu", "?")}); '
          f'{"GPU " + meta.get("gpu", "?") + "; " if args.gpu else ""}started {started}; '
          f'load average at start {meta["loadavg_start"][0]:.2f}, at end {meta["loadavg_end"][0]:.2f}\n')  # fmt: skip
    print(table(servers, rat))
    if args.out:
        Path(args.out).write_text(json.dumps({'meta': meta, 'servers': servers, 'ratios': rat}, indent=2) + '\n')
        log(f'wrote {args.out}')
    return 1 if any('error' in r or 'error' in (r.get('text_only') or {}) for r in servers.values()) else 0


if __name__ == '__main__':
    sys.exit(main())
