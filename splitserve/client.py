"""A small gRPC client for the splitserve API (used by `splitserve client`, the demo and the tests)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc

from .proto import load as load_proto


@dataclass
class Result:
    request_id: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    usage: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    chunks: int = 0


def make_request(prompt: str | None = None, token_ids: list[int] | None = None,
                 messages: list[dict] | None = None, request_id: int = 0, **sampling):
    pb, _ = load_proto()
    req = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sampling))
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(**m) for m in messages)
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.prompt = prompt or ""
    return req


class Client:
    def __init__(self, address: str):
        pb, pb_grpc = load_proto()
        self.pb = pb
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.SplitServeStub(self.channel)

    def stream(self, request, timeout: float | None = None) -> Iterator:
        """The raw reply stream (cancel it with .cancel() to abort the request)."""
        return self.stub.Generate(request, timeout=timeout)

    def generate(self, request, on_chunk: Callable[[list[int], str], None] | None = None,
                 timeout: float | None = 600) -> Result:
        """Run one request to completion; raises grpc.RpcError with the server's status code."""
        from google.protobuf.json_format import MessageToDict
        res = Result()
        for reply in self.stream(request, timeout):
            res.request_id = reply.request_id
            kind = reply.WhichOneof("kind")
            if kind == "chunk":
                res.token_ids.extend(reply.chunk.token_ids)
                res.text += reply.chunk.text
                res.chunks += 1
                if on_chunk:
                    on_chunk(list(reply.chunk.token_ids), reply.chunk.text)
            elif kind == "complete":
                c = reply.complete
                res.finish_reason = c.finish_reason
                res.usage = MessageToDict(c.usage, preserving_proto_field_name=True)
                res.timing = MessageToDict(c.timing, preserving_proto_field_name=True)
                res.info = {"prefill_worker": c.prefill_worker, "decode_worker": c.decode_worker,
                            "remote_prefill": c.remote_prefill, "migrations": c.migrations,
                            "prefill_retries": c.prefill_retries, "complete_token_ids": list(c.token_ids),
                            "complete_text": c.text}
        return res

    def abort(self, request_id: int) -> bool:
        return self.stub.Abort(self.pb.AbortRequest(request_id=request_id)).found

    def model_info(self) -> dict:
        from google.protobuf.json_format import MessageToDict
        return MessageToDict(self.stub.ModelInfo(self.pb.ModelInfoRequest()), preserving_proto_field_name=True)

    def close(self) -> None:
        self.channel.close()
