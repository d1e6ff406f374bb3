"""HTTP/2 on the listeners (issue 17): ``server.py`` (one ``h2`` state machine per connection, a
stream per exchange) and ``listen.py`` (h2c by prior knowledge, ``h2`` by ALPN). The client side is
``sidecar.forward.http2``; gRPC's reading of a call and its status table are ``grpc.py``.
"""
