"""The Azure IoT device SDK (azure-iot-device 2.14.0) connects to Ingot over TLS on 8883 and sends
telemetry unchanged; the messages land in the segment store, read back with `ingot monitor-events`."""

import datetime
import json
import time
import uuid

import pytest
from azure.iot.device import IoTHubDeviceClient, Message, X509
from azure.iot.device import exceptions as device_errors
from azure.iot.hub import IoTHubRegistryManager
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def registry(hub):
    return IoTHubRegistryManager.from_connection_string(hub.connection_string())


def device_client(hub, device_id, key):
    cs = f"HostName=localhost;DeviceId={device_id};SharedAccessKey={key}"
    ca = open(hub.ca).read()
    return IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=ca, connection_retry=False)


def events(hub, device_id):
    out = hub.cli("monitor-events", "--data-dir", str(hub.data_dir), "--from", "start",
                  "--no-follow", "--device", device_id).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_sas_device_sends_telemetry(device_hub):
    device_id = f"sdk-{uuid.uuid4().hex[:8]}"
    created = registry(device_hub).create_device_with_sas(device_id, None, None, "enabled")
    client = device_client(device_hub, device_id, created.authentication.symmetric_key.primary_key)
    client.connect()
    for i in range(5):
        message = Message(json.dumps({"temperature": 20 + i}))
        message.message_id = f"m{i}"
        message.correlation_id = "corr/1"
        message.content_type = "application/json"
        message.content_encoding = "utf-8"
        message.custom_properties["alert"] = "a&b=c d"
        message.custom_properties["seq"] = str(i)
        client.send_message(message)  # returns after the PUBACK
    client.send_message("plain text body")
    client.shutdown()

    received = events(device_hub, device_id)
    assert len(received) == 6
    for i, event in enumerate(received[:5]):
        assert event["deviceId"] == device_id
        assert event["body"] == {"temperature": 20 + i}
        assert event["properties"] == {"alert": "a&b=c d", "seq": str(i)}
        system = event["systemProperties"]
        assert system["message-id"] == f"m{i}"
        assert system["correlation-id"] == "corr/1"
        assert system["content-type"] == "application/json"
        assert system["iothub-connection-device-id"] == device_id
        assert system["iothub-connection-auth-generation-id"] == created.generation_id
        enqueued = datetime.datetime.fromisoformat(event["enqueuedTime"].replace("Z", "+00:00"))
        assert abs((datetime.datetime.now(datetime.timezone.utc) - enqueued).total_seconds()) < 120
    assert received[5]["body"] == "plain text body"
    offsets = [e["offset"] for e in received]
    assert offsets == sorted(offsets) and len({e["partition"] for e in received}) == 1


def test_wrong_key_is_refused(device_hub):
    device_id = f"sdk-{uuid.uuid4().hex[:8]}"
    registry(device_hub).create_device_with_sas(device_id, None, None, "enabled")
    client = device_client(device_hub, device_id, "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXk=")
    with pytest.raises(device_errors.CredentialError):
        client.connect()
    client.shutdown()


def test_disabled_device_is_disconnected_within_a_second(device_hub):
    rm = registry(device_hub)
    device_id = f"sdk-{uuid.uuid4().hex[:8]}"
    created = rm.create_device_with_sas(device_id, None, None, "enabled")
    key = created.authentication.symmetric_key.primary_key
    client = device_client(device_hub, device_id, key)
    client.connect()
    assert client.connected
    rm.update_device_with_sas(device_id, created.etag, key,
                              created.authentication.symmetric_key.secondary_key, "disabled")
    deadline = time.monotonic() + 1.0
    while client.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not client.connected, "a disabled device's connection must be closed within a second"
    client.shutdown()
    again = device_client(device_hub, device_id, key)
    with pytest.raises(device_errors.CredentialError):
        again.connect()
    again.shutdown()


def self_signed(tmp_path, common_name):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    cert_file = tmp_path / f"{common_name}.pem"
    key_file = tmp_path / f"{common_name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    thumbprint = cert.fingerprint(hashes.SHA1()).hex().upper()
    return str(cert_file), str(key_file), thumbprint


def test_x509_device_sends_telemetry(device_hub, tmp_path):
    device_id = f"x509-{uuid.uuid4().hex[:8]}"
    cert_file, key_file, thumbprint = self_signed(tmp_path, device_id)
    registry(device_hub).create_device_with_x509(device_id, thumbprint, None, "enabled")
    client = IoTHubDeviceClient.create_from_x509_certificate(
        X509(cert_file, key_file), hostname="localhost", device_id=device_id,
        server_verification_cert=open(device_hub.ca).read(), connection_retry=False)
    client.connect()
    client.send_message(Message("from a certificate"))
    client.shutdown()
    received = events(device_hub, device_id)
    assert [e["body"] for e in received] == ["from a certificate"]
    assert "x509" in received[0]["systemProperties"]["iothub-connection-auth-method"]

    # A certificate with another thumbprint is refused.
    other_cert, other_key, _ = self_signed(tmp_path, "someone-else")
    impostor = IoTHubDeviceClient.create_from_x509_certificate(
        X509(other_cert, other_key), hostname="localhost", device_id=device_id,
        server_verification_cert=open(device_hub.ca).read(), connection_retry=False)
    with pytest.raises(device_errors.CredentialError):
        impostor.connect()
    impostor.shutdown()
