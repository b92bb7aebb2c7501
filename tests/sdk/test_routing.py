"""Routes written for Azure IoT Hub, applied to what the Azure device SDK (azure-iot-device 2.14.0)
sends unchanged: application properties, content type and encoding in the SDK's property bag, JSON
bodies, and the sender's twin set with the Azure service SDK (azure-iot-hub 2.7.0). Routes and
endpoints are added at run time with the `ingot` command line."""

import json
import uuid

from azure.iot.device import IoTHubDeviceClient, Message
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin


def registry(hub):
    return IoTHubRegistryManager.from_connection_string(hub.connection_string())


def new_device(hub):
    device_id = f"rt-{uuid.uuid4().hex[:8]}"
    created = registry(hub).create_device_with_sas(device_id, None, None, "enabled")
    return device_id, created.authentication.symmetric_key.primary_key


def device_client(hub, device_id, key):
    cs = f"HostName=localhost;DeviceId={device_id};SharedAccessKey={key}"
    return IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=open(hub.ca).read(), connection_retry=False)


def endpoint_bodies(hub, endpoint, device_id):
    args = ["monitor-events", "--data-dir", str(hub.data_dir), "--from", "start", "--no-follow",
            "--device", device_id]
    if endpoint != "events":
        args += ["--endpoint", endpoint]
    out = hub.cli(*args).stdout
    return [json.loads(line)["body"] for line in out.splitlines() if line.strip()]


def json_message(body, **properties):
    message = Message(json.dumps(body))
    message.content_type = "application/json"
    message.content_encoding = "utf-8"
    for name, value in properties.items():
        message.custom_properties[name] = value
    return message


def test_azure_routes_split_sdk_telemetry_by_property_body_and_twin(device_hub):
    hub = device_hub
    device_id, key = new_device(hub)
    other_id, other_key = new_device(hub)
    # The back end tags one device with the service SDK.
    registry(hub).update_twin(device_id, Twin(tags={"site": {"name": "plant-1"}}), "*")

    for endpoint in ("alerts", "hot", "plant"):
        hub.cli("endpoint", "add", endpoint, "--type", "log")
    hub.cli("route", "add", "alerts", "--endpoint", "alerts",
            "--condition", "level = 'critical' AND $contentType = 'application/json'")
    hub.cli("route", "add", "hot", "--endpoint", "hot",
            "--condition", "$body.telemetry.temperature > 30 AND IS_NUMBER($body.telemetry.temperature)")
    hub.cli("route", "add", "plant", "--endpoint", "plant",
            "--condition", "$twin.tags.site.name = 'plant-1' AND $connectionDeviceId = '%s'" % device_id)
    hub.cli("route", "add", "everything-to-events", "--endpoint", "events",
            "--condition", "level != 'critical'")

    client = device_client(hub, device_id, key)
    client.connect()
    client.send_message(json_message({"telemetry": {"temperature": 35}}, level="info"))
    client.send_message(json_message({"telemetry": {"temperature": 20}}, level="critical"))
    client.send_message(json_message({"telemetry": {"temperature": "hot"}}, level="info"))
    client.shutdown()
    other = device_client(hub, other_id, other_key)
    other.connect()
    other.send_message(json_message({"telemetry": {"temperature": 40}}, level="info"))
    other.shutdown()

    assert endpoint_bodies(hub, "alerts", device_id) == [{"telemetry": {"temperature": 20}}]
    assert endpoint_bodies(hub, "hot", device_id) == [{"telemetry": {"temperature": 35}}]
    assert endpoint_bodies(hub, "hot", other_id) == [{"telemetry": {"temperature": 40}}]
    assert endpoint_bodies(hub, "plant", device_id) == [
        {"telemetry": {"temperature": 35}},
        {"telemetry": {"temperature": 20}},
        {"telemetry": {"temperature": "hot"}},
    ]
    assert endpoint_bodies(hub, "plant", other_id) == []
    # `events` gets what its route chose; the critical message matched other routes, so the
    # fallback does not add it.
    assert endpoint_bodies(hub, "events", device_id) == [
        {"telemetry": {"temperature": 35}},
        {"telemetry": {"temperature": "hot"}},
    ]

    for route in ("alerts", "hot", "plant", "everything-to-events"):
        hub.cli("route", "remove", route)
