"""Rebuilding grpc method handlers, for server interceptors that wrap or replace a behavior."""

from __future__ import annotations

from collections.abc import Callable

import grpc


def wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable) -> grpc.RpcMethodHandler:
    """Return `handler` with `wrap(behavior)` as its behavior, keeping its streaming kind and codecs.

    The aio server picks how to drive a behavior from its kind (coroutine vs async
    generator), so `wrap` must return the same kind it was given, or a coroutine function
    (which may use `context.write` / `context.abort` for any streaming kind).
    """
    codecs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **codecs)
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **codecs)
