"""`python -m deployments.launch [CONFIG]`: what `scripts/dev serve` runs, `serve run CONFIG` for people.

It starts the same local Ray + Serve and the same application, from the same Serve config file, but
the terminal stays readable: third-party start-up noise is silenced at its source, one banner says
when the whole graph is ready and where (API, playground, docs, which weights), and Ctrl-C or
SIGTERM stops everything quietly with exit code 0. `serve status` / `serve shutdown -y` work on it
(with `RAY_AUTH_MODE=token`, as `scripts/dev status|stop` set); after a `serve shutdown` it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

# Set before the libraries load (for Serve: before Ray starts, so every replica inherits them); a
# value the user set wins. `srpo generate` uses the same.
QUIET_LIBRARIES = {
    "TRANSFORMERS_VERBOSITY": "error",  # "`CLIPImageProcessor` requires torchvision" once per process
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' and diffusers' weight-loading bars
}
QUIET_ENV = QUIET_LIBRARIES | {
    # Ray turns token auth on by itself when ~/.ray/auth_token exists, and says so; stating it makes
    # the cluster the same whatever the machine holds, and `serve status` needs the same mode.
    "RAY_AUTH_MODE": "token",
}
# Serve's high-throughput data plane (Ray >= 2.55): HAProxy in front of the ingress replicas, which
# take HTTP themselves, and Serve's throughput-optimized settings; about 3x the requests per second of
# the default proxy (docs/benchmarks.md). Ray reads them once per process, so they are set before Ray
# starts. HAProxy's frontend speaks plain HTTP: with TLS in http_options, Serve's own proxy is kept.
# On one machine it is opt-in (SRPO_HIGH_THROUGHPUT_INGRESS=1): a Ray stopped abruptly can leave its
# HAProxy running on fixed stats and metrics ports, and the next start then never becomes ready (seen
# in a full test run). The Kubernetes manifests turn it on, where pods do not outlive their Ray.
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HIGH_THROUGHPUT_SWITCH = "SRPO_HIGH_THROUGHPUT_INGRESS"
# What Ray relays when Serve stops (`serve shutdown` ends its controller with ray.kill during that
# call, as it always does): not an error, so not shown.
SERVE_STOP_NOISE = "ServeController.graceful_shutdown failed"
CONTROLLER_POLL_S = 2.0  # how often the launcher looks for a `serve shutdown` from elsewhere
BANNER_RULE = "-" * 72


def _quiet_environment() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def data_plane_env(http_options: dict[str, Any], high_throughput: bool | None = None) -> dict[str, str]:
    """The environment of Serve's data plane for these http_options: high-throughput when asked for (by
    default, when switched on in the environment), unless TLS."""
    wanted = (os.environ.get(HIGH_THROUGHPUT_SWITCH, "0").strip().lower() in ("1", "true", "yes")
              if high_throughput is None else high_throughput)
    return HIGH_THROUGHPUT_ENV if wanted and not http_options.get("ssl_certfile") else {}


def _application_args(app: dict[str, Any]) -> dict[str, Any]:
    """The builder's args, with the config's per-deployment options folded into `deployment_options`
    (what `serve run` applies from the `deployments:` list)."""
    args = dict(app.get("args") or {})
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    for name, extra in (args.get("deployment_options") or {}).items():
        options[name] = options.get(name, {}) | extra
    args["deployment_options"] = options
    return args


def _builder(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _weights_line() -> str:
    from settings import get_settings

    s = get_settings()
    if s.model_dir is None:
        return (f"TINY RANDOM preset ({s.tiny_dir}): images will be noise. "
                "Set SRPO_MODEL_DIR (and SRPO_SAFETY_DIR, SRPO_TRANSFORMER_FILE) for real weights.")
    return f"{s.model_dir}" + (f" with transformer {s.transformer_file}" if s.transformer_file else "")


def banner(base: str, dashboard_url: str | None, metrics_url: str | None) -> str:
    rows = [
        ("API", f"{base}/fal-ai/flux/srpo  (queue: {base}/queue/fal-ai/flux/srpo)"),
        ("Playground", f"{base}/"),
        ("API docs", f"{base}/docs"),
        ("Weights", _weights_line()),
    ]
    if dashboard_url:
        url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
        # Token auth (QUIET_ENV) makes the dashboard ask for the token.
        rows.append(("Ray dashboard", f"{url}  (token: .venv/bin/ray get-auth-token)"))
    if metrics_url:
        rows.append(("Metrics", f"{metrics_url}  (Prometheus text: ray_srpo_* and Ray's own series)"))
    lines = [BANNER_RULE, "srpo-serve is ready", *(f"  {label:<14}{value}" for label, value in rows),
             "  Stop with Ctrl-C (or `scripts/dev stop` elsewhere); `scripts/dev status` shows the replicas.",
             BANNER_RULE]
    return "\n".join(lines)


def _base_url(http_options: dict[str, Any]) -> str:
    host = http_options.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    scheme = "https" if http_options.get("ssl_certfile") else "http"
    return f"{scheme}://{host}:{http_options.get('port', 8000)}"


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Ray's log monitor prints the workers' last words while they stop (e.g. the controller's
    'graceful_shutdown failed ... killed by ray.kill', which is how Serve always ends it): a normal
    stop is not a crash, so nothing of it is shown."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


class _WithoutLines:
    """A text stream that passes on every line but those containing `marker`. Ray's log monitor and
    its error listener print to whatever sys.stdout is when they print, so this sees their lines."""

    def __init__(self, stream: Any, marker: str) -> None:
        self._stream, self._marker, self._pending = stream, marker, ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if self._marker not in line:
                self._stream.write(line + "\n")
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding...
        return getattr(self._stream, name)


def _serve_is_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def run(config_path: Path) -> int:
    from settings import settings_problems

    if problems := settings_problems():  # else every replica would crash-loop on them, after a minute
        print("srpo-serve cannot start: invalid settings.", *problems, sep="\n  ", file=sys.stderr, flush=True)
        return 2
    sys.stdout = _WithoutLines(sys.stdout, SERVE_STOP_NOISE)
    config = yaml.safe_load(config_path.read_text())
    (app,) = config["applications"]
    http_options = config.get("http_options") or {}
    _quiet_environment()
    for key, value in data_plane_env(http_options).items():  # a value the user set wins
        os.environ.setdefault(key, value)
    import ray
    from ray import serve
    print(f"Starting srpo-serve from {config_path}: Ray, then the application's replicas load their "
          "weights (about a minute on 2 cores)...", flush=True)
    try:
        context = ray.init(logging_level=logging.WARNING)
        # SIGTERM (docker stop, systemd, kill) ends like Ctrl-C; set after ray.init, whose own handler
        # would otherwise print "*** SIGTERM received" and end the process on the spot. SIGINT too: a
        # shell starts background jobs with it ignored, and Python then never raises KeyboardInterrupt.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the banner says when it is ready
        serve.start(proxy_location=config.get("proxy_location"), http_options=http_options,
                    logging_config={"log_level": "WARNING"})  # the controller's and proxy's INFO chatter
        serve.run(_builder(app["import_path"])(_application_args(app)), name=app["name"],
                  route_prefix=app.get("route_prefix", "/"), logging_config=app.get("logging_config"))
        info = context.address_info
        metrics = f"http://{info['node_ip_address']}:{info['metrics_export_port']}/metrics"
        print(banner(_base_url(http_options), context.dashboard_url, metrics), flush=True)
        while _serve_is_running():
            time.sleep(CONTROLLER_POLL_S)
        print("Serve was shut down (serve shutdown); stopping Ray.", flush=True)
    except KeyboardInterrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not break the stop half-way
            signal.signal(sig, signal.SIG_IGN)
        print("\nStopping srpo-serve...", flush=True)
        with _silenced():
            if ray.is_initialized() and _serve_is_running():
                serve.shutdown()
    with _silenced():
        ray.shutdown()
    print("Stopped.", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="serve_config.yaml", type=Path, help="a Serve config file")
    return run(parser.parse_args(argv).config)


if __name__ == "__main__":
    sys.exit(main())
