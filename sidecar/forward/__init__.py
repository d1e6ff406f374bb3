"""The forwarding leg: a request built by the pipeline goes out through a transport, and the
upstream's answer comes back to the client.

- ``transport.py``: the seam (:class:`~sidecar.forward.transport.Transport`) and the one place
  transport errors become refusals;
- ``http11.py``: kept-alive HTTP/1.1 connections per upstream, requests written as built;
- ``connection.py``: one such connection, an asyncio protocol around llhttp (aiohttp's C parser);
- ``body.py``: the request body, read once: buffered within the limit or streamed;
- ``relay.py``: the response to the client, whole or streamed, filtered where a rule asks;
- ``websocket.py``: upgrades, relayed frame by frame;
- ``sessions.py``: the pools, per upstream and to the agent, renewed on SVID rotation.
"""
