"""Server reflection answers as grpc.reflection.v1 (what grpcurl and newer tools
ask first) and as v1alpha, over a real server."""

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from recsvc.api.reflection import V1, V1ALPHA

pytestmark = pytest.mark.integration


def message_class(name):
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(name))


@pytest.mark.parametrize("service", [V1, V1ALPHA])
def test_reflection_v1_and_v1alpha(server, service):
    package = service.rsplit(".", 1)[0]
    request_class = message_class(f"{package}.ServerReflectionRequest")
    response_class = message_class(f"{package}.ServerReflectionResponse")
    call = server.channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    requests = [
        request_class(list_services=""),
        request_class(file_containing_symbol="recsvc.v1.Recommender"),
        request_class(file_containing_symbol=V1),
        request_class(file_containing_symbol="recsvc.v1.Nope"),
    ]
    listed, recommender, v1, missing = list(call(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"recsvc.v1.Recommender", "grpc.health.v1.Health", V1, V1ALPHA} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in recommender.file_descriptor_response.file_descriptor_proto]  # fmt: skip
    assert "Recommender" in {s.name for f in files for s in f.service}
    (v1_file,) = [descriptor_pb2.FileDescriptorProto.FromString(b)
                  for b in v1.file_descriptor_response.file_descriptor_proto]  # fmt: skip
    assert v1_file.package == "grpc.reflection.v1"
    method = v1_file.service[0].method[0]
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
