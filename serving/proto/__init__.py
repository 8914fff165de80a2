"""The Open Inference Protocol's gRPC messages (grpc_predict_v2.proto), built from its compiled descriptor set.

Why not protoc's generated *_pb2.py: generated modules register their types in protobuf's process-wide default
pool, and Triton's and KServe's client libraries register the same names there (`inference.ModelInferRequest`),
so importing both in one process fails with "duplicate symbol". The server's types live in a pool of their own
instead; on the wire they are the same messages. protobuf still does all the encoding.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from types import SimpleNamespace

PROTO = Path(__file__).with_name("grpc_predict_v2.proto")
DESCRIPTOR_SET = Path(__file__).with_name("grpc_predict_v2.binpb")  # protoc --descriptor_set_out of PROTO
PACKAGE = "inference"
SERVICE = "inference.GRPCInferenceService"


@cache
def messages() -> SimpleNamespace:
    """Every message class of the protocol by name: messages().ModelInferRequest, … (loaded once)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file:
        pool.Add(file)
    package = pool.FindFileByName(PROTO.name)
    return SimpleNamespace(**{name: message_factory.GetMessageClass(descriptor)
                              for name, descriptor in package.message_types_by_name.items()},
                           service=pool.FindServiceByName(SERVICE))
