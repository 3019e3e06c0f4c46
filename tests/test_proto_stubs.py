"""The committed gRPC stubs (proto/qnext/v1/*_pb2*.py, the `qnext.v1` package) describe exactly the schema of the
.proto files: compared as compiled descriptors, so a newer protoc's different boilerplate is not a difference but
an edited field, message or RPC without regenerated stubs is."""

from google.protobuf import descriptor_pb2

from qnext.rpc.proto_stubs import descriptor_set
from qnext.v1 import generation_pb2, generation_pb2_grpc


def test_committed_stubs_match_the_proto_files() -> None:
    fresh = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set())
    [want] = [f for f in fresh.file if f.name == "qnext/v1/generation.proto"]
    for message in _messages(want.message_type):  # the embedded descriptor leaves out the derived json names
        for field in message.field:
            field.ClearField("json_name")
    got = descriptor_pb2.FileDescriptorProto.FromString(generation_pb2.DESCRIPTOR.serialized_pb)
    assert got == want, "proto/qnext/v1 stubs are stale: run `python -m qnext.rpc.proto_stubs` and commit them"


def _messages(messages):
    for m in messages:
        yield m
        yield from _messages(m.nested_type)


def test_the_service_stub_has_every_rpc() -> None:
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    stub_methods = {m for m in vars(generation_pb2_grpc.GenerationServicer) if not m.startswith("_")}
    assert stub_methods == {m.name for m in service.methods}


def test_the_service_implements_every_method():
    """The generated GenerationServicer's methods only raise NotImplementedError (UNIMPLEMENTED to a client):
    GenerationService must define every method of the .proto itself, so none of those is ever reached."""
    from qnext.rpc import convert
    from qnext.rpc.service import GenerationService
    methods = [m.name for m in convert.DESCRIPTOR.services_by_name["Generation"].methods]
    missing = [m for m in methods if m not in vars(GenerationService)]
    assert not missing, f"GenerationService does not implement {missing}"
