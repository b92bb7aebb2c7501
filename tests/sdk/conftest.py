"""Fixtures that run the real `ingot` binary on free ports with a fresh data directory."""

import os
import pathlib
import socket
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("INGOT_BIN", str(ROOT / "target" / "debug" / "ingot"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hub:
    """One `ingot serve` process; `data_dir` survives restarts."""

    def __init__(self, data_dir, mqtt_tls_port=None):
        self.data_dir = pathlib.Path(data_dir)
        self.port = free_port()
        self.mqtt_port = free_port()
        self.mqtt_tls_port = mqtt_tls_port or free_port()
        self.proc = None
        self.log = self.data_dir.parent / (self.data_dir.name + ".log")

    def start(self):
        self.proc = subprocess.Popen(
            [BIN, "serve", "--data-dir", str(self.data_dir), "--https-port", str(self.port),
             "--mqtt-port", str(self.mqtt_port), "--mqtt-tls-port", str(self.mqtt_tls_port),
             "--listen-address", "127.0.0.1"],
            # Small segments: each hub preallocates two per partition.
            env={**os.environ, "INGOT_STORE__SEGMENT_BYTES_MAX": "1048576"},
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingot serve exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                for port in (self.port, self.mqtt_port, self.mqtt_tls_port):
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("ingot serve did not start listening within 30 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=20)

    def cli(self, *args, check=True):
        result = subprocess.run([BIN, *args], capture_output=True, text=True,
                                env={**os.environ, "INGOT_DATA_DIR": str(self.data_dir)})
        if check and result.returncode != 0:
            raise AssertionError(f"ingot {' '.join(args)} failed: {result.stderr}")
        return result

    def connection_string(self, policy="iothubowner"):
        return self.cli("connection-string", "--policy", policy).stdout.strip()

    @property
    def ca(self):
        return str(self.data_dir / "tls" / "ca.pem")


@pytest.fixture(scope="module")
def device_hub(tmp_path_factory):
    """A hub on port 8883, where the Azure device SDK always connects."""
    hub = Hub(tmp_path_factory.mktemp("device-hub") / "data", mqtt_tls_port=8883).start()
    os.environ["REQUESTS_CA_BUNDLE"] = hub.ca
    yield hub
    hub.stop()
    assert hub.proc.returncode == 0, "the hub must exit cleanly on SIGTERM"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hub = Hub(tmp_path_factory.mktemp("hub") / "data").start()
    # msrest (requests) trusts this bundle for HTTPS: the hub's development CA.
    os.environ["REQUESTS_CA_BUNDLE"] = hub.ca
    yield hub
    hub.stop()
    assert hub.proc.returncode == 0, "the hub must exit cleanly on SIGTERM"
