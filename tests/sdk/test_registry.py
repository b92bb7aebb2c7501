"""The Azure IoT Hub service SDK (azure-iot-hub 2.7.0) manages Ingot's identity registry unchanged."""

import base64
import uuid

import pytest
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import AuthenticationMechanism, ExportImportDevice, SymmetricKey
from msrest.exceptions import HttpOperationError

THUMB1 = "A" * 40
THUMB2 = "B" * 64


def manager(hub, policy="iothubowner"):
    return IoTHubRegistryManager.from_connection_string(hub.connection_string(policy))


def new_id(prefix="dev"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def status_of(error):
    return error.value.response.status_code


def test_sas_device_lifecycle(hub):
    rm = manager(hub)
    device_id = new_id()
    created = rm.create_device_with_sas(device_id, None, None, "enabled")
    assert created.device_id == device_id
    assert created.status == "enabled"
    assert created.authentication.type == "sas"
    primary = created.authentication.symmetric_key.primary_key
    assert len(base64.b64decode(primary)) == 32, "missing keys are generated like Azure's"
    assert primary != created.authentication.symmetric_key.secondary_key
    assert created.generation_id and created.etag
    assert created.connection_state == "Disconnected"

    fetched = rm.get_device(device_id)
    assert fetched.etag == created.etag
    assert fetched.authentication.symmetric_key.primary_key == primary

    updated = rm.update_device_with_sas(
        device_id, fetched.etag, primary, fetched.authentication.symmetric_key.secondary_key, "disabled",
        status_reason="stolen")
    assert updated.status == "disabled"
    assert updated.status_reason == "stolen"
    assert updated.etag != fetched.etag
    assert updated.generation_id == created.generation_id
    assert updated.authentication.symmetric_key.primary_key == primary

    rm.delete_device(device_id)
    with pytest.raises(HttpOperationError) as error:
        rm.get_device(device_id)
    assert status_of(error) == 404
    assert error.value.response.headers["iothub-errorcode"] == "DeviceNotFound"


def test_given_keys_are_kept(hub):
    rm = manager(hub)
    key1 = base64.b64encode(b"k" * 32).decode()
    key2 = base64.b64encode(b"s" * 16).decode()
    device = rm.create_device_with_sas(new_id(), key1, key2, "enabled")
    assert device.authentication.symmetric_key.primary_key == key1
    assert device.authentication.symmetric_key.secondary_key == key2
    with pytest.raises(HttpOperationError) as error:
        rm.create_device_with_sas(new_id(), base64.b64encode(b"short").decode(), None, "enabled")
    assert status_of(error) == 400


def test_x509_devices(hub):
    rm = manager(hub)
    device_id = new_id("x509")
    device = rm.create_device_with_x509(device_id, THUMB1, THUMB2, "enabled")
    assert device.authentication.type == "selfSigned"
    assert device.authentication.x509_thumbprint.primary_thumbprint == THUMB1
    assert device.authentication.x509_thumbprint.secondary_thumbprint == THUMB2
    updated = rm.update_device_with_x509(device_id, device.etag, THUMB2, None, "enabled")
    assert updated.authentication.x509_thumbprint.primary_thumbprint == THUMB2

    ca_id = new_id("ca")
    ca_device = rm.create_device_with_certificate_authority(ca_id, "enabled")
    assert ca_device.authentication.type == "certificateAuthority"
    assert rm.get_device(ca_id).authentication.type == "certificateAuthority"


def test_conflicts_and_preconditions(hub):
    rm = manager(hub)
    device_id = new_id()
    device = rm.create_device_with_sas(device_id, None, None, "enabled")
    with pytest.raises(HttpOperationError) as error:
        rm.create_device_with_sas(device_id, None, None, "enabled")
    assert status_of(error) == 409
    assert error.value.response.headers["iothub-errorcode"] == "DeviceAlreadyExists"

    with pytest.raises(HttpOperationError) as error:
        rm.update_device_with_sas(device_id, "c3RhbGU", None, None, "disabled")
    assert status_of(error) == 412
    with pytest.raises(HttpOperationError) as error:
        rm.delete_device(device_id, etag="c3RhbGU")
    assert status_of(error) == 412
    rm.delete_device(device_id, etag=device.etag)
    with pytest.raises(HttpOperationError) as error:
        rm.delete_device(device_id)
    assert status_of(error) == 404


def test_ids_with_special_characters(hub):
    rm = manager(hub)
    device_id = "dev+1#x$(a)!'=@,*?%_." + uuid.uuid4().hex[:6]
    rm.create_device_with_sas(device_id, None, None, "enabled")
    assert rm.get_device(device_id).device_id == device_id
    rm.delete_device(device_id)


def test_invalid_ids_are_refused(hub):
    rm = manager(hub)
    for bad in ["a" * 129, "caf\u00e9", "a b"]:
        with pytest.raises(HttpOperationError) as error:
            rm.create_device_with_sas(bad, None, None, "enabled")
        assert status_of(error) == 400, bad


def test_modules(hub):
    rm = manager(hub)
    device_id = new_id()
    rm.create_device_with_sas(device_id, None, None, "enabled")
    module = rm.create_module_with_sas(device_id, "m1", None, None, None)
    assert module.module_id == "m1"
    assert module.device_id == device_id
    assert module.authentication.type == "sas"
    rm.create_module_with_x509(device_id, "m2", "builder", THUMB1, None)
    rm.create_module_with_certificate_authority(device_id, "m3", None)
    assert sorted(m.module_id for m in rm.get_modules(device_id)) == ["m1", "m2", "m3"]
    assert rm.get_module(device_id, "m2").managed_by == "builder"

    fetched = rm.get_module(device_id, "m1")
    key = fetched.authentication.symmetric_key.primary_key
    updated = rm.update_module_with_sas(device_id, "m1", "me", fetched.etag, key, None)
    assert updated.managed_by == "me"
    assert updated.authentication.symmetric_key.primary_key == key

    with pytest.raises(HttpOperationError) as error:
        rm.create_module_with_sas(device_id, "m1", None, None, None)
    assert status_of(error) == 409
    rm.delete_module(device_id, "m1")
    with pytest.raises(HttpOperationError) as error:
        rm.get_module(device_id, "m1")
    assert status_of(error) == 404
    with pytest.raises(HttpOperationError) as error:
        rm.create_module_with_sas(new_id("absent"), "m1", None, None, None)
    assert status_of(error) == 404

    # Deleting the device deletes its modules.
    rm.delete_device(device_id)
    rm.create_device_with_sas(device_id, None, None, "enabled")
    assert rm.get_modules(device_id) == []


def test_list_and_statistics(hub):
    rm = manager(hub)
    before = rm.get_device_registry_statistics()
    ids = [new_id("list") for _ in range(5)]
    for i, device_id in enumerate(ids):
        rm.create_device_with_sas(device_id, None, None, "disabled" if i == 0 else "enabled")
    stats = rm.get_device_registry_statistics()
    assert stats.total_device_count == before.total_device_count + 5
    assert stats.enabled_device_count == before.enabled_device_count + 4
    assert stats.disabled_device_count == before.disabled_device_count + 1
    listed = {d.device_id for d in rm.get_devices()}
    assert set(ids) <= listed
    assert len(rm.get_devices(2)) == 2


def test_bulk(hub):
    rm = manager(hub)
    ids = [new_id("bulk") for _ in range(3)]
    sas = AuthenticationMechanism(type="sas", symmetric_key=SymmetricKey())
    devices = [ExportImportDevice(id=i, import_mode="create", status="enabled", authentication=sas) for i in ids]
    result = rm.bulk_create_or_update_devices(devices)
    assert result.is_successful
    assert all(rm.get_device(i).status == "enabled" for i in ids)

    # One failing entry is reported; the others are applied.
    mixed = [
        ExportImportDevice(id=ids[0], import_mode="create", authentication=sas),
        ExportImportDevice(id=ids[1], import_mode="delete"),
    ]
    try:
        result = rm.bulk_create_or_update_devices(mixed)
    except HttpOperationError as error:
        assert error.response.status_code == 400
        body = error.response.json()
        assert body["isSuccessful"] is False
        assert [e["deviceId"] for e in body["errors"]] == [ids[0]]
    else:
        assert not result.is_successful
        assert [e.device_id for e in result.errors] == [ids[0]]
    with pytest.raises(HttpOperationError):
        rm.get_device(ids[1])


def test_wrong_key_is_refused(hub):
    good = hub.connection_string()
    wrong_key = base64.b64encode(b"w" * 32).decode()
    bad = good.split("SharedAccessKey=")[0] + "SharedAccessKey=" + wrong_key
    rm = IoTHubRegistryManager.from_connection_string(bad)
    with pytest.raises(HttpOperationError) as error:
        rm.get_devices()
    assert status_of(error) == 401
    assert error.value.response.headers["iothub-errorcode"] == "IotHubUnauthorizedAccess"


def test_policy_permissions(hub):
    owner = manager(hub)
    device_id = new_id()
    owner.create_device_with_sas(device_id, None, None, "enabled")

    reader = manager(hub, "registryRead")
    assert reader.get_device(device_id).device_id == device_id
    with pytest.raises(HttpOperationError) as error:
        reader.create_device_with_sas(new_id(), None, None, "enabled")
    assert status_of(error) == 401
    with pytest.raises(HttpOperationError) as error:
        reader.delete_device(device_id)
    assert status_of(error) == 401

    writer = manager(hub, "registryReadWrite")
    writer.create_device_with_sas(new_id(), None, None, "enabled")

    for policy in ["service", "device"]:
        with pytest.raises(HttpOperationError) as error:
            manager(hub, policy).get_device(device_id)
        assert status_of(error) == 401, policy
