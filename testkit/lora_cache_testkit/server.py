"""A real ComfyUI server in a subprocess, driven over HTTP and the websocket as users' scripts
do. Used by the demo and the server tests."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from . import cpu_device, host

ROOT = host.ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctrl_c_as_in_a_terminal() -> None:
    # A test command started in the background of a non-interactive shell (a CI step, `cmd &`)
    # has SIGINT ignored, and a child inherits that: Python then never raises KeyboardInterrupt,
    # and Ctrl-C (stop()) would not stop the server. A user's terminal gives the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_base_dir(base: Path, cpu_as_device: bool = False) -> Path:
    """A ComfyUI base directory with this package in custom_nodes/ (as a user would clone it).

    `cpu_as_device`, for the server tests on a CPU-only host: a test-only custom node beside it
    makes the package handle the CPU like a GPU (cpu_device.py), so an unload moves the factors
    and the next run must move them back, the code path a GPU takes."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "lora_cache_loader"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    if cpu_as_device:
        (base / "custom_nodes" / cpu_device.NODE_FILE).write_text(cpu_device.node_source())
    for sub in ("models/loras", "models/diffusion_models", "output", "input", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


class ComfyServer:
    def __init__(self, base: Path, extra_args: tuple[str, ...] = (), log_path: Path | None = None,
                 env: dict[str, str] | None = None):
        self.base = base
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = str(uuid.uuid4())
        self.extra_args = extra_args
        self.log_path = log_path or base / "server.log"
        self.proc: subprocess.Popen | None = None
        self.ws = None

    def start(self, timeout: float = 120.0) -> ComfyServer:
        # -X faulthandler: a server that has to be aborted writes every thread's stack to its log.
        cmd = [sys.executable, "-X", "faulthandler", str(host.COMFY_DIR / "main.py"), "--cpu",
               "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
               "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes", *self.extra_args]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - the server writes to it until stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(cmd, cwd=str(host.COMFY_DIR), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=_ctrl_c_as_in_a_terminal)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.log_path}")
            try:
                self.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        else:
            self.stop()
            raise TimeoutError(f"ComfyUI did not answer within {timeout}s; see {self.log_path}")
        # ComfyUI loads custom nodes before it listens, so the patch is in place by now; a
        # server that silently ran without it would test the CPU path instead of the GPU's.
        if (self.base / "custom_nodes" / cpu_device.NODE_FILE).exists() and \
                cpu_device.MARKER.encode() not in self.log_path.read_bytes():
            self.stop()
            raise RuntimeError(f"the CPU-as-device node did not patch the package; see {self.log_path}")
        import websocket

        self.ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=60)
        return self

    def stop(self) -> int | None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
            self.ws = None
        if self.proc is not None and self.proc.poll() is None:
            # ComfyUI's prompt worker is a daemon thread: interrupted mid-sampling at exit, the
            # process aborts. Let queued work finish first (bounded), as a user would.
            self.wait_idle(timeout=120)
            # Ctrl-C, as a user stops it: ComfyUI's main catches KeyboardInterrupt, logs
            # "Stopped server" and exits 0. terminate/kill only if it does not.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # Stuck: ComfyUI's faulthandler writes where the main thread is on SIGABRT (log).
                self.proc.send_signal(signal.SIGABRT)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()
        return self.proc.returncode if self.proc else None

    def wait_idle(self, timeout: float = 120.0) -> bool:
        """Waits until nothing is running or pending in ComfyUI's queue."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                q = self.get("/queue")
            except (RuntimeError, urllib.error.URLError, OSError):
                return False
            if not q["queue_running"] and not q["queue_pending"]:
                return True
            time.sleep(0.2)
        return False

    def stopped_cleanly(self) -> bool:
        """Exit status 0, the shutdown line in the log, and the port closed."""
        if self.proc is None or self.proc.returncode != 0:
            return False
        if b"Stopped server" not in self.log_path.read_bytes():
            return False
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) != 0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def request(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path: str):
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def output_images(self, prompt_id: str) -> list[bytes]:
        """The PNG files a finished prompt saved, fetched as the UI does: /history, then /view."""
        outputs = self.get(f"/history/{prompt_id}")[prompt_id]["outputs"]
        files = [img for out in outputs.values() for img in out.get("images", [])]
        return [self.get_bytes("/view?" + urllib.parse.urlencode(
            {"filename": f["filename"], "subfolder": f["subfolder"], "type": f["type"]})) for f in files]

    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout: float = 120.0) -> list[tuple[str, dict]]:
        """Reads the websocket until the prompt finished; returns its messages."""
        msgs = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            raw = self.ws.recv()
            if not isinstance(raw, str):
                continue  # previews
            msg = json.loads(raw)
            data = msg.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            msgs.append((msg["type"], data))
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return msgs
            if msg["type"] == "execution_error":
                # ComfyUI still sends the final "executing: None"; keep reading for it
                continue
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict) -> dict:
        """Queues a prompt and waits for it. Returns the prompt id, messages and wall time."""
        t0 = time.perf_counter()
        status, body = self.queue(prompt)
        if status != 200:
            return {"status": status, "body": body, "messages": [], "seconds": time.perf_counter() - t0}
        msgs = self.wait(body["prompt_id"])
        return {"status": status, "prompt_id": body["prompt_id"], "messages": msgs,
                "seconds": time.perf_counter() - t0}


def clean(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)
