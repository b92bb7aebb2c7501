"""Generic MQTT clients (paho-mqtt, mosquitto_pub) over plain MQTT, and clients that misbehave at
the socket level: each refused case gets its documented outcome while other devices keep flowing."""

import json
import shutil
import socket
import subprocess
import time
import uuid

import paho.mqtt.client as paho
import pytest
from azure.iot.hub import IoTHubRegistryManager


def new_device(hub):
    device_id = f"plain-{uuid.uuid4().hex[:8]}"
    rm = IoTHubRegistryManager.from_connection_string(hub.connection_string())
    rm.create_device_with_sas(device_id, None, None, "enabled")
    token = hub.cli("sas-token", "--device", device_id, "--ttl", "600").stdout.strip()
    return device_id, f"localhost/{device_id}/?api-version=2021-04-12", token


def events(hub, device_id):
    out = hub.cli("monitor-events", "--data-dir", str(hub.data_dir), "--from", "start",
                  "--no-follow", "--device", device_id).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_paho_publishes_qos0_and_qos1(hub):
    device_id, username, token = new_device(hub)
    client = paho.Client(client_id=device_id, clean_session=False, protocol=paho.MQTTv311)
    client.username_pw_set(username, token)
    client.connect("127.0.0.1", hub.mqtt_port, keepalive=30)
    client.loop_start()
    topic = f"devices/{device_id}/messages/events/kind=paho"
    infos = [client.publish(topic, f"m{i}", qos=1) for i in range(20)]
    infos.append(client.publish(topic, "last", qos=0))
    for info in infos:
        info.wait_for_publish(timeout=10)
        assert info.is_published()
    client.disconnect()
    client.loop_stop()
    deadline = time.monotonic() + 5
    received = events(hub, device_id)
    while len(received) < 21 and time.monotonic() < deadline:
        time.sleep(0.05)
        received = events(hub, device_id)
    assert [e["body"] for e in received] == [f"m{i}" for i in range(20)] + ["last"]
    assert all(e["properties"] == {"kind": "paho"} for e in received)


def test_paho_with_a_bad_token_is_refused(hub):
    device_id, username, token = new_device(hub)
    client = paho.Client(client_id=device_id, protocol=paho.MQTTv311)
    client.username_pw_set(username, token.replace("sig=", "sig=AAAA"))
    results = []
    client.on_connect = lambda c, u, flags, rc: results.append(rc)
    client.connect("127.0.0.1", hub.mqtt_port, keepalive=30)
    client.loop_start()
    deadline = time.monotonic() + 5
    while not results and time.monotonic() < deadline:
        time.sleep(0.02)
    client.loop_stop()
    assert results == [5], "CONNACK 5: not authorized"


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="tests/run installs mosquitto-clients")
def test_mosquitto_pub(hub):
    device_id, username, token = new_device(hub)
    topic = f"devices/{device_id}/messages/events/%24.ct=text%2Fplain&from=mosquitto"
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(hub.mqtt_port), "-V", "mqttv311",
                    "-i", device_id, "-u", username, "-P", token, "-q", "1", "-t", topic,
                    "-m", "hello from mosquitto"], check=True, timeout=20)
    received = events(hub, device_id)
    assert [e["body"] for e in received] == ["hello from mosquitto"]
    assert received[0]["properties"] == {"from": "mosquitto"}
    assert received[0]["systemProperties"]["content-type"] == "text/plain"
    # A wrong password: mosquitto_pub exits non-zero on CONNACK 5.
    bad = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(hub.mqtt_port), "-V", "mqttv311",
                          "-i", device_id, "-u", username, "-P", "nope", "-q", "1", "-t", topic, "-m", "x"],
                         capture_output=True, timeout=20)
    assert bad.returncode != 0


def test_silent_and_stalled_clients_do_not_hold_up_others(hub):
    # A client that never sends CONNECT, one that sends half a packet, and one that publishes
    # but never reads its PUBACKs.
    silent = socket.create_connection(("127.0.0.1", hub.mqtt_port))
    partial = socket.create_connection(("127.0.0.1", hub.mqtt_port))
    partial.sendall(b"\x10\x20\x00\x04MQ")
    device_id, username, token = new_device(hub)
    stalled = paho.Client(client_id=device_id, protocol=paho.MQTTv311)
    stalled.username_pw_set(username, token)
    stalled.connect("127.0.0.1", hub.mqtt_port, keepalive=30)
    stalled.loop(timeout=1.0)  # reads the CONNACK, then the client never reads again
    for i in range(2000):
        stalled.publish(f"devices/{device_id}/messages/events/", b"x" * 1000, qos=1)
        stalled.loop_write()

    other_id, other_user, other_token = new_device(hub)
    client = paho.Client(client_id=other_id, protocol=paho.MQTTv311)
    client.username_pw_set(other_user, other_token)
    client.connect("127.0.0.1", hub.mqtt_port, keepalive=30)
    client.loop_start()
    info = client.publish(f"devices/{other_id}/messages/events/", "flowing", qos=1)
    info.wait_for_publish(timeout=10)
    assert info.is_published()
    client.disconnect()
    client.loop_stop()
    assert [e["body"] for e in events(hub, other_id)] == ["flowing"]
    for sock in (silent, partial):
        sock.close()
    stalled.disconnect()
