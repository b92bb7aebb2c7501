"""Twins, direct methods and cloud-to-device messages, end to end: a back end written with the Azure
service SDK (azure-iot-hub 2.7.0) and devices written with the Azure device SDK (azure-iot-device
2.14.0), unchanged, against Ingot on 8883. C2D is sent with `ingot c2d send` (the service SDK sends
C2D over AMQP only)."""

import json
import queue
import threading
import time
import uuid

import pytest
from azure.iot.device import IoTHubDeviceClient, MethodResponse
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, QuerySpecification, Twin, TwinProperties
from msrest.exceptions import HttpOperationError


def registry(hub):
    return IoTHubRegistryManager.from_connection_string(hub.connection_string())


def new_device(hub):
    device_id = f"tmc-{uuid.uuid4().hex[:8]}"
    created = registry(hub).create_device_with_sas(device_id, None, None, "enabled")
    return device_id, created.authentication.symmetric_key.primary_key


def device_client(hub, device_id, key):
    cs = f"HostName=localhost;DeviceId={device_id};SharedAccessKey={key}"
    return IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=open(hub.ca).read(), connection_retry=False)


def patch_with_version(patches, version):
    """The next desired patch of `version`. The SDK also hands the handler the whole desired document
    when its re-GET after (re)connecting finds a version it has not seen; skip those."""
    deadline = time.monotonic() + 10
    while True:
        patch = patches.get(timeout=max(0.1, deadline - time.monotonic()))
        if patch["$version"] == version:
            return patch


def error_code(error):
    """Azure's numeric errorCode from an HttpOperationError's body."""
    outer = json.loads(error.response.text)
    return json.loads(outer["Message"])["errorCode"]


def test_desired_patch_reaches_the_device_handler(device_hub):
    device_id, key = new_device(device_hub)
    client = device_client(device_hub, device_id, key)
    patches = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    client.connect()
    try:
        service = registry(device_hub)
        patch = Twin(properties=TwinProperties(desired={"interval": 5, "mode": {"eco": True}}))
        twin = service.update_twin(device_id, patch, "*")
        assert twin.properties.desired["interval"] == 5
        version = twin.properties.desired["$version"]
        received = patch_with_version(patches, version)
        assert received["interval"] == 5 and received["mode"] == {"eco": True}
        assert received["$version"] == version
        # A second patch deletes a key with null.
        service.update_twin(device_id, Twin(properties=TwinProperties(desired={"mode": None})),
                            twin.etag)
        received = patch_with_version(patches, version + 1)
        assert received == {"mode": None, "$version": version + 1}
        full = client.get_twin()
        assert full["desired"] == {"interval": 5, "$version": version + 1}
    finally:
        client.shutdown()


def test_reported_properties_are_read_by_the_service(device_hub):
    device_id, key = new_device(device_hub)
    client = device_client(device_hub, device_id, key)
    client.connect()
    try:
        client.patch_twin_reported_properties({"fw": "1.2", "battery": {"level": 80}})
        client.patch_twin_reported_properties({"battery": {"charging": True}})
        twin = client.get_twin()
        assert twin["reported"]["fw"] == "1.2"
        assert twin["reported"]["battery"] == {"level": 80, "charging": True}
        assert "$metadata" not in twin["reported"]
        service_twin = registry(device_hub).get_twin(device_id)
        reported = service_twin.properties.reported
        assert reported["fw"] == "1.2" and reported["battery"]["charging"] is True
        assert reported["$version"] == twin["reported"]["$version"]
        assert "$lastUpdated" in reported["$metadata"]["battery"]["charging"]
        assert service_twin.connection_state == "Connected"
    finally:
        client.shutdown()
    assert registry(device_hub).get_twin(device_id).connection_state == "Disconnected"


def test_twin_query_finds_devices_by_tag_and_reported_property(device_hub):
    service = registry(device_hub)
    region = f"r{uuid.uuid4().hex[:6]}"
    ids = []
    for fw in (1, 2, 5):
        device_id, key = new_device(device_hub)
        ids.append(device_id)
        service.update_twin(device_id, Twin(tags={"location": {"region": region}}), "*")
        client = device_client(device_hub, device_id, key)
        client.connect()
        client.patch_twin_reported_properties({"fw": fw})
        client.shutdown()
    query = (f"SELECT * FROM devices WHERE tags.location.region = '{region}' "
             "AND properties.reported.fw < 3")
    result = service.query_iot_hub(QuerySpecification(query=query))
    assert sorted(t.device_id for t in result.items) == sorted(ids[:2])
    assert result.type == "twin"
    # Aggregates are "raw" items, which the SDK can only deserialize as twins: read them with the CLI.
    count = device_hub.cli("twin", "query",
                           f"SELECT COUNT() AS n FROM devices WHERE tags.location.region = '{region}'")
    assert json.loads(count.stdout) == [{"n": 3}]
    # Paging: one item per page, continuation tokens until the end.
    seen, token = [], None
    while True:
        page = service.query_iot_hub(QuerySpecification(
            query=f"SELECT * FROM devices WHERE tags.location.region = '{region}'"), token, 1)
        seen += [t.device_id for t in page.items]
        token = page.continuation_token
        if not token:
            break
    assert sorted(seen) == sorted(ids)


def test_service_invokes_a_method_and_gets_the_handlers_answer(device_hub):
    device_id, key = new_device(device_hub)
    client = device_client(device_hub, device_id, key)

    def handler(request):
        payload = {"echo": request.payload, "name": request.name}
        client.send_method_response(MethodResponse.create_from_method_request(request, 201, payload))

    client.on_method_request_received = handler
    client.connect()
    try:
        service = registry(device_hub)
        results = []

        def call(i):
            request = CloudToDeviceMethod(method_name="reboot", payload={"delay": i},
                                          response_timeout_in_seconds=10)
            results.append(service.invoke_device_method(device_id, request))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.payload["echo"]["delay"] for r in results) == list(range(8))
        assert all(r.status == 201 and r.payload["name"] == "reboot" for r in results)
    finally:
        client.shutdown()


def test_method_to_an_offline_device_is_404103(device_hub):
    device_id, _ = new_device(device_hub)
    request = CloudToDeviceMethod(method_name="reboot", payload=None,
                                  response_timeout_in_seconds=5, connect_timeout_in_seconds=1)
    started = time.monotonic()
    with pytest.raises(HttpOperationError) as raised:
        registry(device_hub).invoke_device_method(device_id, request)
    assert raised.value.response.status_code == 404
    assert error_code(raised.value) == 404103
    assert raised.value.response.headers["iothub-errorcode"] == "DeviceNotOnline"
    assert time.monotonic() - started >= 1  # it waited for the connect timeout


def test_slow_method_handler_is_504101(device_hub):
    device_id, key = new_device(device_hub)
    client = device_client(device_hub, device_id, key)
    answered = threading.Event()

    def slow(request):
        time.sleep(7)
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, None))
        answered.set()

    client.on_method_request_received = slow
    client.connect()
    try:
        request = CloudToDeviceMethod(method_name="slow", payload={},
                                      response_timeout_in_seconds=5)
        with pytest.raises(HttpOperationError) as raised:
            registry(device_hub).invoke_device_method(device_id, request)
        assert raised.value.response.status_code == 504
        assert error_code(raised.value) == 504101
        # The late answer is dropped by the hub; the device stays connected and usable.
        assert answered.wait(10)
        client.patch_twin_reported_properties({"after": "late answer"})
    finally:
        client.shutdown()


def test_c2d_sent_with_the_cli_reaches_the_message_handler(device_hub):
    device_id, key = new_device(device_hub)
    client = device_client(device_hub, device_id, key)
    messages = queue.Queue()
    client.on_message_received = messages.put
    client.connect()
    try:
        time.sleep(0.5)  # the SDK subscribes in the background after connect
        sent = json.loads(device_hub.cli(
            "c2d", "send", device_id, "--body", "hello device", "--prop", "color=red",
            "--prop", "path=a/b&c=d", "--ack", "full", "--message-id", "m-1",
            "--correlation-id", "c-1", "--content-type", "text/plain").stdout)
        assert sent["messageId"] == "m-1"
        message = messages.get(timeout=10)
        assert message.data == b"hello device"
        assert message.message_id == "m-1"
        assert message.correlation_id == "c-1"
        assert message.content_type == "text/plain"
        assert message.ack == "full"
        assert message.custom_properties == {"color": "red", "path": "a/b&c=d"}
    finally:
        client.shutdown()
    # The PUBACK completed it: positive feedback is recorded.
    deadline = time.monotonic() + 10
    while True:
        feedback = json.loads(device_hub.cli("c2d", "feedback").stdout)
        mine = [f for f in feedback if f["deviceId"] == device_id]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(f["originalMessageId"], f["statusCode"]) for f in mine] == [("m-1", "Success")]


def test_c2d_sent_while_offline_arrives_when_the_device_reconnects(device_hub):
    device_id, key = new_device(device_hub)
    for i in range(3):
        device_hub.cli("c2d", "send", device_id, "--body", f"queued {i}")
    client = device_client(device_hub, device_id, key)
    messages = queue.Queue()
    client.on_message_received = messages.put
    client.connect()
    try:
        bodies = [messages.get(timeout=10).data for _ in range(3)]
        assert bodies == [b"queued 0", b"queued 1", b"queued 2"]
    finally:
        client.shutdown()
    # Completed: nothing is delivered again on the next connection.
    client = device_client(device_hub, device_id, key)
    again = queue.Queue()
    client.on_message_received = again.put
    client.connect()
    try:
        with pytest.raises(queue.Empty):
            again.get(timeout=2)
    finally:
        client.shutdown()
