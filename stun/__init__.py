"""STUN Binding server and client (RFC 5389 / 8489). Stands alone: imports nothing else of the project."""

from .client import StunError, StunResult, stun_request
from .codec import (
    BindingRequest,
    BindingResponse,
    DropReason,
    StunHeader,
    build_binding_request,
    build_binding_response,
    classify_request,
    max_response_size,
    parse_binding_response,
    parse_header,
    respond,
)
from .server import StunServer, start_stun_server

__all__ = [
    "BindingRequest",
    "BindingResponse",
    "DropReason",
    "StunError",
    "StunHeader",
    "StunResult",
    "StunServer",
    "build_binding_request",
    "build_binding_response",
    "classify_request",
    "max_response_size",
    "parse_binding_response",
    "parse_header",
    "respond",
    "start_stun_server",
    "stun_request",
]
