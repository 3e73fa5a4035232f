"""Process lifecycle: Triton + online state + the asyncio gRPC server.

`RankingServer.start()` starts a real Triton Inference Server (a child process
serving the bundle's encoder with dynamic batching), embeds the catalog through
it, builds the online features from the events, and serves RankingService plus the
standard grpc.health.v1 service and server reflection. `stop()` drains calls
and stops Triton, leaving no process behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from featurizer.online_features import OnlineFeatures
from featurizer.online_store import InProcessConfig, InProcessStore
from featurizer.schema import read_dataset
from ranker.bundle import load_bundle
from semrank.ranking.v1 import ranking_service_pb2 as pb
from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.encoder_client import EncoderClient
from serving.ranking import Catalog, RankingEngine
from serving.service import RankingService
from serving.triton_worker import TritonProcess, TritonWorkerConfig, free_port
from serving.validation import Limits

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RankingService"].full_name


@dataclass(frozen=True)
class ServeConfig:
    bundle_dir: Path
    data_dir: Path  # items + events the online state is built from
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    triton_grpc_port: int = 0  # 0 picks free ports for Triton
    triton_http_port: int = 0
    triton_metrics_port: int = 0
    max_message_bytes: int = 4 * 1024 * 1024
    grace_s: float = 5.0
    limits: Limits = field(default_factory=Limits)


class RankingServer:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.triton: TritonProcess | None = None
        self.encoder: EncoderClient | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.engine: RankingEngine | None = None

    async def start(self) -> int:
        cfg = self.cfg
        bundle = load_bundle(cfg.bundle_dir)
        ds = read_dataset(cfg.data_dir)
        log.info("data: %s", ds.report)
        try:
            self.triton = TritonProcess(
                TritonWorkerConfig(
                    model_dir=bundle.encoder.resolve(bundle.path),
                    max_length=bundle.encoder.max_length,
                    grpc_port=cfg.triton_grpc_port or free_port(),
                    http_port=cfg.triton_http_port or free_port(),
                    metrics_port=cfg.triton_metrics_port or free_port(),
                )
            )
            self.triton.start()
            self.encoder = EncoderClient(self.triton.grpc_url)
            catalog = await Catalog.build(ds.items, self.encoder.encode_bulk)
            online = OnlineFeatures(InProcessStore(InProcessConfig(path=None)), ds.items)
            online.apply(ds.events)
            log.info("online features built from %d events (up to %s)", ds.events.height, online.watermark)
            self.engine = RankingEngine(bundle=bundle, catalog=catalog, online=online, encode=self.encoder.encode)
            options = [
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
            ]
            self.server = grpc.aio.server(options=options)
            pb_grpc.add_RankingServiceServicer_to_server(RankingService(self.engine, cfg.limits), self.server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            reflection.enable_server_reflection(
                [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
                self.server,
            )
            self.port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
            if not self.port:
                raise OSError(f"cannot bind gRPC port {cfg.host}:{cfg.port} (in use?)")
            await self.server.start()
        except BaseException:
            await self.stop()
            raise
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s:%d (bundle %s, %d items, Triton at %s)",
            SERVICE_NAME, cfg.host, self.port, bundle.version, len(catalog.item_ids), self.triton.grpc_url,
        )
        return self.port

    async def stop(self) -> None:
        """Stop accepting, drain in-flight calls, close the Triton client, stop Triton."""
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(self.cfg.grace_s)
            self.server = None
        if self.encoder is not None:
            await self.encoder.close()
            self.encoder = None
        if self.triton is not None:
            self.triton.stop()
            self.triton = None

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()
