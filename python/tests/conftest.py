"""Fixtures for the Python package's tests: the repository's tiny CLIP and demo data, the
`clipft` binary (for a trainer to talk to and for the CLI's embeddings), and a fresh local run
registry per test."""

import csv
import os
import subprocess
import sys
import threading

import pytest

REPO = os.environ.get("CLIPFT_REPO") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.abspath(os.environ.get("CLIPFT_BIN") or os.path.join(REPO, "target", "release", "clipft"))
TINY = os.path.join(REPO, "tests", "fixtures", "clip-tiny")
DEMO = os.path.join(REPO, "data", "demo")


def demo_rows(name):
    with open(os.path.join(DEMO, name), newline="") as f:
        return list(csv.reader(f))


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A fresh local run registry, logged in, for one test."""
    import clipft

    for var in ("CLIPFT_TRAINER", "CLIPFT_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    data_dir = tmp_path / "registry"
    clipft.login(data_dir=str(data_dir))
    monkeypatch.chdir(tmp_path)
    return data_dir


class Trainer:
    """A `clipft trainer` on a free loopback port, stopped at the end of the test."""

    def __init__(self, data_dir, token):
        self.token = token
        self.proc = subprocess.Popen(
            [BIN, "trainer", "--host", "127.0.0.1", "--port", "0", "--port-monitoring", "0",
             "--data-dir", str(data_dir), "--auth-token", token],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        seen = []
        for line in self.proc.stderr:
            seen.append(line)
            if "serving on " in line:
                addr = line.split("serving on ")[1].split()[0]
                self.address = f"grpc://127.0.0.1:{addr.rsplit(':', 1)[1]}"
                break
        else:
            raise RuntimeError("the trainer exited:\n" + "".join(seen))
        # Keep draining stderr so the trainer never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    t = Trainer(tmp_path / "trainer-data", "s3cret-token")
    monkeypatch.chdir(tmp_path)
    yield t
    t.stop()


def run_python(code, env=None, timeout=300):
    """Runs `code` in a fresh interpreter; returns the completed process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=timeout)
