"""The gRPC frontend (grpc.aio): proto messages <-> Router calls. No serving logic lives here."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..proto import load as load_proto
from .router import RequestError, Router

pb, pb_grpc = load_proto()
SERVICE_NAME = "splitserve.v1.SplitServe"


def sampling_dict(sp) -> dict:
    """proto SamplingParams -> SamplingParams kwargs (0 means 'default' for the numeric fields)."""
    d = {"max_tokens": sp.max_tokens or 64, "temperature": sp.temperature, "top_k": sp.top_k,
         "top_p": sp.top_p or 1.0, "stop_token_ids": list(sp.stop_token_ids), "stop": list(sp.stop),
         "ignore_eos": sp.ignore_eos}
    if sp.HasField("seed"):
        d["seed"] = sp.seed
    return d


class SplitServeServicer(pb_grpc.SplitServeServicer):
    def __init__(self, router: Router, model_info: dict):
        self.router = router
        self.model_info = model_info

    async def Generate(self, request, context):
        which = request.WhichOneof("input")
        rid = str(request.request_id) if request.request_id else None
        try:
            flight = self.router.admit(
                prompt=request.prompt if which == "prompt" else None,
                token_ids=list(request.token_ids.ids) if which == "token_ids" else None,
                messages=[{"role": m.role, "content": m.content} for m in request.chat.messages]
                if which == "chat" else None,
                params=sampling_dict(request.sampling), request_id=rid, priority=request.priority,
                slo={"ttft_ms": request.slo.ttft_ms, "tpot_ms": request.slo.tpot_ms} if request.HasField("slo")
                else None)
        except RequestError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            return
        out_id = int(flight.rid) if flight.rid.isdigit() else 0
        async for ev in self.router.generate(flight):
            if ev.kind == "chunk":
                yield pb.GenerateReply(request_id=out_id, chunk=pb.Chunk(token_ids=ev.token_ids, text=ev.text))
            elif ev.kind == "complete":
                i = ev.info
                yield pb.GenerateReply(request_id=out_id, complete=pb.Complete(
                    finish_reason=i["finish_reason"], usage=pb.Usage(**i["usage"]), timing=pb.Timing(**i["timing"]),
                    prefill_worker=i["prefill_worker"], decode_worker=i["decode_worker"],
                    remote_prefill=i["remote_prefill"], token_ids=i["token_ids"], text=i["text"],
                    migrations=i["migrations"], prefill_retries=i["prefill_retries"]))
            else:
                code = getattr(grpc.StatusCode, ev.info["code"], grpc.StatusCode.INTERNAL)
                await context.abort(code, ev.info["message"])

    async def Abort(self, request, context):
        return pb.AbortReply(found=await self.router.abort(str(request.request_id)))

    async def ModelInfo(self, request, context):
        return pb.ModelInfoReply(**self.model_info,
                                 num_prefill_workers=len(self.router.workers.names("prefill")),
                                 num_decode_workers=len(self.router.workers.names("decode")))


async def start_grpc(router: Router, model_info: dict, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_SplitServeServicer_to_server(SplitServeServicer(router, model_info), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
