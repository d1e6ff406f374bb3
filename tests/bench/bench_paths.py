"""µs per call of the canonical-request helpers (not part of the test run).

Run: python tests/bench/bench_paths.py
The machine is noisy (PERFORMANCE.md): compare figures within one run only.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.policy.mcp import parse_mcp_request
from sidecar.http.target import (
    PathOptions,
    canonical_path,
    check_header_names,
    normalize_host,
    split_route_prefix,
)
from tests.bench.timing import per_call_us

OPTS = PathOptions()
PATHS = {
    "clean short": "/v1/invoices/42",
    "clean long": "/v1/customers/cus_8f3a/invoices/2026-11/lines/17/attachments/receipt.pdf",
    "'/.well-known' (fast path)": "/.well-known/openid-configuration",
    "dot segment": "/v1/./invoices/42",
    "encoded unreserved": "/v1/%7Euser/%41bc",
    "encoded dots": "/v1/a/%2e%2e/b/./c",
    "double slash": "/v1//invoices///42",
    "encoded non-ASCII": "/search/caf%c3%a9/%E2%82%AC",
}
HEADERS = ["Host", "User-Agent", "Accept", "Content-Type", "Content-Length", "traceparent",
           "X-Sidecar-Task", "Accept-Encoding"]
MCP_BODY = (b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search_tickets",'
            b'"arguments":{"query":"refund","limit":10,"filters":{"status":["open","pending"]}}}}')



def main() -> None:
    for label, path in PATHS.items():
        us = per_call_us(lambda p=path: canonical_path(p, OPTS))
        print(f"canonical_path {label:25s} {us:6.2f} µs  {path} -> {canonical_path(path, OPTS)}")
    target = "/billing-api/v1/invoices/42?expand=lines"
    uncached = normalize_host.__wrapped__
    rows: list[tuple[str, Callable[[], object]]] = [
        ("split_route_prefix + canonical_path", lambda: canonical_path(split_route_prefix(target)[1])),
        ("normalize_host cached (name:port)", lambda: normalize_host("Billing.Internal:8443", "https")),
        ("normalize_host uncached (name:port)", lambda: uncached("Billing.Internal:8443", "https")),
        ("normalize_host uncached ([v6]:port)", lambda: uncached("[::1]:8443", "https")),
        ("check_header_names (8 names)", lambda: check_header_names(HEADERS)),
    ]
    for label, fn in rows:
        print(f"{label:40s} {per_call_us(fn):6.2f} µs")
    mcp_us = per_call_us(lambda: parse_mcp_request(MCP_BODY, "application/json", 65536), 20_000)
    print(f"{f'parse_mcp_request ({len(MCP_BODY)} B tools/call)':40s} {mcp_us:6.2f} µs")

if __name__ == "__main__":
    main()
