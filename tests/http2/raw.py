"""A raw HTTP/2 client for the tests of this directory: header blocks sent as written (``h2``'s client
state machine, no validation or normalization of what it sends), over any open stream pair."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events


def client() -> h2.connection.H2Connection:
    """A client connection that sends what it is given, preface and SETTINGS queued."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                                                normalize_outbound_headers=False))
    conn.initiate_connection()
    return conn


async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, blocks: list[list[tuple[str, str]]],
                  fields: list[dict[bytes, bytes]] | None = None) -> tuple[list[tuple[int, bytes]], int | None]:
    """Each header block on its own stream (END_STREAM); each stream's status (0: reset, or no answer)
    and body, and the GOAWAY error code if the other side ended the connection. Closes the writer.
    ``fields`` (one dict per block) gets each answer's header and trailer fields."""
    conn = client()
    ids = []
    for block in blocks:
        ids.append(conn.get_next_available_stream_id())
        conn.send_headers(ids[-1], block, end_stream=True)
    writer.write(conn.data_to_send())
    status: dict[int, int] = {}
    bodies: dict[int, bytes] = {i: b"" for i in ids}
    ended: set[int] = set()
    goaway = None
    try:
        async with asyncio.timeout(10):
            while len(ended) < len(ids) and goaway is None and (data := await reader.read(65536)):
                for event in conn.receive_data(data):
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and fields:
                        fields[ids.index(event.stream_id)].update(dict(event.headers))
                    if isinstance(event, h2.events.ResponseReceived):
                        status[event.stream_id] = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        ended.add(event.stream_id)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        goaway = event.error_code
                writer.write(conn.data_to_send())
    finally:
        writer.close()
    return [(status.get(i, 0), bodies[i]) for i in ids], goaway
