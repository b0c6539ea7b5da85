"""Gateway entry point: `python -m server --config config.json [--worker-url URL ...]`.

Workers come from `service.worker_urls` plus every `--worker-url`; with neither, the gateway
expects `--num-workers` local workers on `worker_base_port + i`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from common.config import add_config_arguments, load_config_or_report
from server.app import create_app, default_worker_urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--worker-url", action="append", default=[], help="worker base URL (repeatable)")
    parser.add_argument("--num-workers", type=int, default=1, help="local workers when no URL is given")
    parser.add_argument("--host", default=None, help="overrides service.host")
    parser.add_argument("--port", type=int, default=None, help="overrides service.gateway_port")
    args = parser.parse_args(argv)
    config = load_config_or_report(args.config, args.overrides, "gateway")
    if config is None:
        return 2
    worker_urls = config.service.worker_urls + args.worker_url
    if not worker_urls:
        worker_urls = default_worker_urls(config, args.num_workers)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("gateway").info("workers: %s", ", ".join(worker_urls))
    service = config.service
    ssl = {}
    if config.tls.enabled:
        ssl = {"ssl_certfile": config.tls.cert_path, "ssl_keyfile": config.tls.key_path}
    uvicorn.run(
        create_app(config, worker_urls),
        host=args.host or service.host,
        port=args.port or service.gateway_port,
        ws_max_size=service.limits.max_message_bytes,
        ws_per_message_deflate=False,
        log_level="info",
        **ssl,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
