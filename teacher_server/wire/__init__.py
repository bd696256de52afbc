"""Generated protobuf messages for `opd.teacher.v1` plus hand-written service glue.

Only the message module (`teacher_pb2`) is generated (by `make proto`); the service stub and
handler registration are written by hand in `service.py` so the package imports on any grpcio
>= 1.84 (generated `_pb2_grpc` files refuse grpcio runtimes older than the generator).
"""
from teacher_server.wire import teacher_pb2 as pb  # noqa: F401
